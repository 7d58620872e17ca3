"""PolicyTrainer: one data-parallel rank of a DeepSpeed engine over a Hugging Face causal LM.

A plain class with typed methods. The driver wraps it with ``ray.remote`` (one actor per rank) and
calls every method on all ranks: DeepSpeed's collectives need every rank to take part.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rayrl.data.batch import TokenBatch


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
    seed: int = 0
    num_threads: int = 1


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
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PolicyTrainer:
    """One rank. Call order: ``address()`` on rank 0, then ``setup(...)`` on all ranks."""

    def __init__(self, spec: TrainerSpec, rank: int):
        self.spec = spec
        self.rank = rank
        self.engine = None
        torch.set_num_threads(max(1, spec.num_threads))

    # ---- set-up -----------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP and a free port for the process-group rendezvous (called on rank 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((ip, 0))
            return ip, sock.getsockname()[1]

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int) -> dict:
        import deepspeed
        from transformers import AutoModelForCausalLM

        from rayrl.optim import decay_param_groups, lr_multiplier

        spec = self.spec
        on_gpu = torch.cuda.is_available()
        os.environ.update({
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "RANK": str(self.rank), "WORLD_SIZE": str(spec.world_size),
            # Ray gives each GPU actor its own visible device: it is always cuda:0 there.
            "LOCAL_RANK": "0" if on_gpu else str(local_rank),
            "LOCAL_SIZE": "1" if on_gpu else str(local_world_size),
        })
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_pretrained(
            spec.model_path, torch_dtype=torch.float32, attn_implementation=spec.attn_implementation)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        optimizer = torch.optim.AdamW(decay_param_groups(model.named_parameters(), spec.weight_decay),
                                      lr=spec.lr, betas=tuple(spec.adam_betas))

        def schedule(step: int) -> float:
            return lr_multiplier(step, schedule=spec.lr_schedule, warmup_steps=spec.warmup_steps,
                                 total_steps=spec.total_steps, min_lr_ratio=spec.min_lr_ratio)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(spec),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        return {"rank": self.rank, "parameters": sum(p.numel() for p in model.parameters())}

    # ---- numerics ---------------------------------------------------------------------------
    def _forward_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """(B, T-1) log-probs of each next token under the current weights."""
        from rayrl.algorithms import token_logprobs

        device = self.engine.device
        if batch.is_packed:
            dtype = None if self.spec.attn_implementation == "sdpa" else self._compute_dtype()
            attention_mask = batch.block_causal_mask(dtype).to(device)
        else:
            attention_mask = batch.padding_mask().to(device)
        input_ids = batch.input_ids.to(device)
        logits = self.engine(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=batch.position_ids.to(device), use_cache=False).logits
        return token_logprobs(logits[:, :-1], input_ids[:, 1:])

    def _compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.spec.dtype == "bfloat16" else torch.float32

    def train_step(self, micro_batches: list[TokenBatch], global_num_tokens: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches.

        Every micro-batch contributes sum(NLL) / global_num_tokens: summed over all micro-batches and
        ranks that is the token-mean over the whole global batch, whatever the split. DeepSpeed
        averages gradients over ranks, so the loss handed to it is scaled by the world size, and
        gradient accumulation must not divide again (scale_wrt_gas=False).
        """
        from rayrl.algorithms import sft_loss

        assert len(micro_batches) == self.spec.grad_accum_steps, "micro-batch count != grad_accum_steps"
        self.engine.train()
        loss_share = 0.0
        lr = self.engine.get_lr()[0]
        grad_norm = float("nan")
        for index, batch in enumerate(micro_batches):
            logps = self._forward_logprobs(batch)
            mask = batch.loss_mask[:, 1:].to(logps.device)
            loss, _ = sft_loss(logps, mask, global_num_tokens=global_num_tokens)
            self.engine.backward(loss * self.spec.world_size, scale_wrt_gas=False)
            loss_share += float(loss.detach())
            if index == len(micro_batches) - 1:
                grad_norm = self._grad_norm_before_step()
            # DeepSpeed counts micro-steps in step(): it only updates weights at the boundary.
            self.engine.step()
        ds_norm = self.engine.get_global_grad_norm()
        if ds_norm is not None:
            grad_norm = float(ds_norm)
        return {"loss_share": loss_share, "grad_norm": grad_norm, "lr": lr, "peak_rss_mb": peak_rss_mb()}

    def _grad_norm_before_step(self) -> float:
        # Plain (ZeRO-0, fp32) DeepSpeed clips without recording the norm; the grads are already
        # all-reduced here, so measure them ourselves. Other modes report the norm after step().
        if self.spec.zero_stage != 0 or self.spec.dtype != "float32":
            return float("nan")
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[TokenBatch]) -> tuple[float, int]:
        """(sum of NLL over target tokens, number of target tokens) on this rank's share."""
        self.engine.eval()
        total, count = 0.0, 0
        for batch in micro_batches:
            logps = self._forward_logprobs(batch)
            mask = batch.loss_mask[:, 1:].to(logps.device)
            total += float(-(logps * mask).sum())
            count += int(mask.sum())
        return total, count

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                 stop_ids: list[int]) -> list[list[int]]:
        """Greedy completions (token ids, stop token excluded). All ranks must call it under ZeRO-3."""
        self.engine.eval()
        module = self.engine.module
        device = self.engine.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: generation continues from the right edge
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention[i, width - len(prompt):] = 1
        output = module.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids,
            synced_gpus=self.spec.zero_stage == 3 and self.spec.world_size > 1)
        completions = []
        for row in output[:, width:].tolist():
            cut = next((i for i, tok in enumerate(row) if tok in stop_ids or tok == pad_id), len(row))
            completions.append(row[:cut])
        return completions

    # ---- persistence ------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> float:
        start = time.perf_counter()
        self.engine.save_checkpoint(directory, tag="engine")
        return time.perf_counter() - start

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="engine")
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {directory}")

    def export_hf(self, directory: str) -> None:
        """Write the full model in Hugging Face format (safetensors) from rank 0."""
        import deepspeed
        import torch.distributed as dist

        module = self.engine.module
        if self.spec.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.rank == 0 else None
        else:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.rank == 0 else None
        if self.rank == 0:
            Path(directory).mkdir(parents=True, exist_ok=True)
            module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        dist.barrier()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
