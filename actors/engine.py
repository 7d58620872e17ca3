"""What every trainable role shares: one rank of a DeepSpeed engine, its optimizer step and its state.

PolicyTrainer, RewardModelTrainer (and the PPO critic) each own a TrainingEngine around their model:
composition, so each role keeps its own typed methods while gradient accumulation, loss scaling,
checkpoints and the full-weights gather live in exactly one place.
"""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from rayrl.actors.models import export_model, param_groups
from rayrl.config import PeftConfig
from rayrl.optim import lr_multiplier


@dataclass(frozen=True)
class TrainerSpec:
    """Everything a rank needs to build its engine (derived from a stage config by the driver)."""

    model_path: str
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    total_steps: int
    lr: float
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    dtype: str = "float32"
    zero_stage: int = 0
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    peft: PeftConfig | None = None
    seed: int = 0
    num_threads: int = 1
    # RL: forwards pack each micro-batch's rows (rayrl.data.packing), and a step takes however many
    # micro-batches its token budget cut (the same count on every rank)
    packing: bool = False


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(spec: TrainerSpec) -> dict[str, Any]:
    config = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum_steps * spec.world_size,
        "gradient_clipping": spec.grad_clip or 0.0,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.dtype == "bfloat16"},
        # A client torch AdamW compiles nothing (DeepSpeed's fused/CPU Adam JIT-compile for ~45 s).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, spec.deepspeed_overrides)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_ip() -> str:
    import ray  # slow: ray; the driver imports this module for TrainerSpec

    return ray.util.get_node_ip_address()


def rendezvous_address() -> tuple[str, int]:
    """This node's IP and a free port for the process-group rendezvous (asked of rank 0)."""
    ip = node_ip()
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return ip, sock.getsockname()[1]


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                       local_rank: int, local_world_size: int) -> None:
    import deepspeed  # slow: deepspeed; the driver imports this module for TrainerSpec

    on_gpu = torch.cuda.is_available()
    os.environ.update({
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        # Ray gives each GPU actor its own visible device: it is always cuda:0 there.
        "LOCAL_RANK": "0" if on_gpu else str(local_rank),
        "LOCAL_SIZE": "1" if on_gpu else str(local_world_size),
    })
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, verbose=False)
    if not on_gpu:
        release_shm_buffer(rank, master_port)


def release_shm_buffer(rank: int, master_port: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce maps one 69 MB /dev/shm file per rank and never removes
    it: every process group leaked one until /dev/shm filled the RAM. All ranks open every peer's file
    during init, so once all are past init (the barrier) the names can go; the mappings stay valid."""
    dist.barrier()
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_{rank}"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# A micro-batch loss function returns (this micro-batch's share of the global-batch loss, stats
# already weighted by the same share, so that summing over micro-batches and ranks gives means).
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


class TrainingEngine:
    def __init__(self, spec: TrainerSpec, model: torch.nn.Module, param_groups: list[dict]):
        import deepspeed  # slow: deepspeed

        self.spec = spec
        optimizer = torch.optim.AdamW(param_groups, lr=spec.lr, betas=tuple(spec.adam_betas))

        def schedule(step: int) -> float:
            return lr_multiplier(step, schedule=spec.lr_schedule, warmup_steps=spec.warmup_steps,
                                 total_steps=spec.total_steps, min_lr_ratio=spec.min_lr_ratio)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(spec),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def forward(self, **inputs):
        return self.engine(**inputs)

    def optimizer_step(self, micro_batches: Sequence[Any], loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward every micro-batch, then one optimizer step.

        ``loss_fn`` returns this micro-batch's share of the global-batch loss (its sum divided by
        the global count over all micro-batches and ranks). DeepSpeed averages gradients over
        ranks, so the share is scaled by the world size, and gradient accumulation must not divide
        again (scale_wrt_gas=False): the gradient is then exactly that of the global-batch mean.
        """
        if not self.spec.packing:
            assert len(micro_batches) == self.spec.grad_accum_steps, "micro-batch count != grad_accum_steps"
        started = time.perf_counter()
        self.engine.train()
        lr = self.engine.get_lr()[0]
        totals: dict[str, float] = {"loss": 0.0}
        grad_norm = float("nan")
        for index, batch in enumerate(micro_batches):
            # Token-budget micro-batches vary in number: the boundary is the last one, not a fixed count.
            self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            loss_share, stats = loss_fn(batch)
            self.engine.backward(loss_share * self.spec.world_size, scale_wrt_gas=False)
            totals["loss"] += float(loss_share.detach())
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            if index == len(micro_batches) - 1:
                grad_norm = self._grad_norm_before_step()
            # DeepSpeed counts micro-steps in step(): it only updates weights at the boundary.
            self.engine.step()
        ds_norm = self.engine.get_global_grad_norm()
        if ds_norm is not None:
            grad_norm = float(ds_norm)
        return {**totals, "grad_norm": grad_norm, "lr": lr, "peak_rss_mb": peak_rss_mb(),
                "time/trainer_compute": time.perf_counter() - started}

    def _grad_norm_before_step(self) -> float:
        # Plain (ZeRO-0, fp32) DeepSpeed clips without recording the norm; the grads are already
        # all-reduced here, so measure them ourselves. Other modes report the norm after step().
        if self.spec.zero_stage != 0 or self.spec.dtype != "float32":
            return float("nan")
        norms = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def param_group_lrs(self) -> list[dict[str, Any]]:
        """Each optimizer group's current LR and size (LoRA+ gives the B matrices their own)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [{"lr": g["lr"], "params": [names.get(id(p), "?") for p in g["params"]]}
                for g in self.engine.optimizer.param_groups]

    def save_checkpoint(self, directory: str) -> float:
        start = time.perf_counter()
        self.engine.save_checkpoint(directory, tag="engine")
        return time.perf_counter() - start

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="engine")
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")

    @contextlib.contextmanager
    def gathered_state(self) -> Iterator[dict[str, torch.Tensor]]:
        """The whole module's live weights (on its device) on every rank, valid inside the block
        (gathered from all ranks under ZeRO-3; all ranks must enter)."""
        import deepspeed  # slow: deepspeed

        if self.spec.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module.state_dict()
        else:
            yield self.module.state_dict()

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The whole module's weights on CPU at rank 0 (gathered from all ranks under ZeRO-3)."""
        with self.gathered_state() as state:
            return {k: v.detach().cpu().clone() for k, v in state.items()} if rank == 0 else None

    @staticmethod
    def barrier() -> None:
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def shutdown() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class TrainerRank:
    """One rank of a trainable role (PolicyTrainer, RewardModelTrainer, Critic): the rendezvous, the
    DeepSpeed engine around the role's model, checkpoints and the Hugging Face export. A role supplies
    :meth:`build_model` and its own typed train/eval methods. Call order (TrainerGroup does it):
    ``address()`` on rank 0, then ``setup(...)`` on all ranks."""

    def __init__(self, spec: TrainerSpec, rank: int):
        self.spec = spec
        self.rank = rank
        self.train_engine: TrainingEngine | None = None
        torch.set_num_threads(max(1, spec.num_threads))

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def node_ip(self) -> str:
        return node_ip()

    def build_model(self) -> torch.nn.Module:
        """The role's model (PEFT applied), on CPU; the engine moves and wraps it."""
        raise NotImplementedError

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int,
              separate_reference: bool = False) -> dict:
        spec = self.spec
        init_process_group(self.rank, spec.world_size, master_addr, master_port, local_rank, local_world_size)
        torch.manual_seed(spec.seed)
        model = self.build_model()
        groups = param_groups(model, weight_decay=spec.weight_decay, lr=spec.lr,
                              lora_plus_ratio=spec.peft.lora_plus_ratio if spec.peft else None)
        self.train_engine = TrainingEngine(spec, model, groups)
        return {"rank": self.rank, "parameters": sum(p.numel() for p in model.parameters()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def param_group_lrs(self) -> list[dict]:
        return self.train_engine.param_group_lrs()

    def save_checkpoint(self, directory: str) -> float:
        return self.train_engine.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self.train_engine.load_checkpoint(directory)

    def export_hf(self, directory: str) -> None:
        """Write the full model (and/or the adapter) in Hugging Face format from rank 0."""
        state = self.train_engine.full_state_dict(self.rank)
        if self.rank == 0:
            export_model(self.train_engine.module, state, directory, self.spec.peft)
        self.train_engine.barrier()

    def shutdown(self) -> None:
        TrainingEngine.shutdown()
