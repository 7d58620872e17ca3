"""PolicyTrainer: one data-parallel rank of the policy, a DeepSpeed engine over an HF causal LM.

A plain class with typed methods. The driver wraps it with ``ray.remote`` (one actor per rank) and
calls every method on all ranks: DeepSpeed's collectives need every rank to take part.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from rayrl.actors.engine import TrainerRank, TrainerSpec, rendezvous_address
from rayrl.actors.models import load_model, lora_adapter, merged_named_weights, virtual_token_count
from rayrl.algorithms import entropy_from_logits, sft_loss, token_logprobs
from rayrl.cuda_transfer import broadcast_buckets, nccl_communicator, pack_bucket, plan_buckets, share_ipc
from rayrl.data.batch import TokenBatch
from rayrl.data.packing import forward_maybe_packed
from rayrl.data.preference import KTOBatch, PreferenceBatch
from rayrl.data.rollout import RolloutBatch
from rayrl.objectives import (PolicyGradientObjective, PreferenceObjective, ResponseLogprobs,
                              policy_gradient_objective_loss, preference_loss)
from rayrl.weight_sync import ExportedWeights

__all__ = ["PolicyTrainer", "TrainerSpec"]


class PolicyTrainer(TrainerRank):
    """One rank of the policy (SFT, DPO family, GRPO/PPO): a causal LM on DeepSpeed."""

    def __init__(self, spec: TrainerSpec, rank: int):
        super().__init__(spec, rank)
        self.reference: torch.nn.Module | None = None
        self._shared_buffers: list[torch.Tensor] = []  # packed CUDA buffers lent to rollout engines (IPC)
        self._shared_layouts: list = []
        self._broadcast = None  # NCCL communicator to the rollout engines (rank 0, split layouts)

    # ---- set-up -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        spec = self.spec
        return load_model(spec.model_path, "causal_lm", attn_implementation=spec.attn_implementation,
                          pad_token_id=None, peft=spec.peft, gradient_checkpointing=spec.gradient_checkpointing)

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int,
              separate_reference: bool = False) -> dict:
        """Build the engine. ``separate_reference`` loads a frozen copy of the starting weights for
        reference log-probs (not needed with PEFT: the adapter-disabled base is the reference)."""
        info = super().setup(master_addr, master_port, local_rank, local_world_size)
        spec = self.spec
        if separate_reference and spec.peft is None:
            self.reference = load_model(spec.model_path, "causal_lm", attn_implementation=spec.attn_implementation,
                                        pad_token_id=None, peft=None, gradient_checkpointing=False)
            self.reference.to(self.train_engine.device).eval().requires_grad_(False)
        return info

    # ---- forward passes ---------------------------------------------------------------------
    def _token_logprobs(self, batch: TokenBatch, model=None, temperature: float = 1.0) -> torch.Tensor:
        """(B, T-1) log-probs of each next token (the policy, or ``model`` if given) under
        ``softmax(logits / temperature)``."""
        return self._next_token_outputs(batch, model, temperature)[0]

    def _next_token_outputs(self, batch: TokenBatch, model=None, temperature: float = 1.0,
                            with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T-1) log-probs of each next token under ``softmax(logits / temperature)`` and, if asked, the
        (detached) entropy of that distribution at each position. With ``spec.packing`` the forward runs
        on the rows packed (``RowPacking``) and both come back in ``batch``'s own layout."""
        def outputs(forward: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits = self._logits(forward, model)
            logps = token_logprobs(logits[:, :-1], forward.input_ids.to(logits.device)[:, 1:], temperature=temperature)
            if not with_entropy:
                return logps, None
            with torch.no_grad():
                return logps, entropy_from_logits(logits[:, :-1].detach(), temperature=temperature)

        return forward_maybe_packed(batch, self.spec.packing, outputs)

    def _logits(self, batch: TokenBatch, model=None) -> torch.Tensor:
        """(B, T, V) logits of the policy (or ``model``), virtual prompt-tuning tokens cut off."""
        engine = self.train_engine
        mask_dtype = None if self.spec.attn_implementation == "sdpa" else self._compute_dtype()
        inputs = batch.model_inputs(engine.device, mask_dtype)
        logits = (model or engine.forward)(**inputs, use_cache=False).logits
        return logits[:, virtual_token_count(self.spec.peft):]

    def _compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.spec.dtype == "bfloat16" else torch.float32

    @contextlib.contextmanager
    def _reference_weights(self) -> Iterator[object]:
        """The model to call for reference log-probs: the frozen copy, the adapter-disabled base
        (PEFT), or, with neither, the current policy (used before training: the precompute pass)."""
        if self.reference is not None:
            yield self.reference
        elif self.spec.peft is not None:
            with self.train_engine.module.disable_adapter():
                yield None
        else:
            yield None

    @torch.no_grad()
    def sequence_logprobs(self, micro_batches: list[TokenBatch], reference: bool = False) -> list[torch.Tensor]:
        """Per micro-batch, (B,) summed log-probs of each row's target tokens (loss_mask), no gradient."""
        self.train_engine.engine.eval()
        out = []
        with self._reference_weights() if reference else contextlib.nullcontext() as model:
            for batch in micro_batches:
                logps = self._token_logprobs(batch, model)
                mask = batch.loss_mask[:, 1:].to(logps.device)
                out.append(torch.where(mask, logps, torch.zeros_like(logps)).sum(-1).cpu())
        return out

    # ---- training steps ---------------------------------------------------------------------
    def train_sft_step(self, micro_batches: list[TokenBatch], global_num_tokens: int) -> dict[str, float]:
        """One optimizer step of masked NLL, normalised by the global-batch target-token count."""
        def loss_fn(batch: TokenBatch):
            logps = self._token_logprobs(batch)
            loss, _ = sft_loss(logps, batch.loss_mask[:, 1:].to(logps.device), global_num_tokens=global_num_tokens)
            return loss, {}

        return self.train_engine.optimizer_step(micro_batches, loss_fn)

    def _preference_losses(self, batch: PreferenceBatch | KTOBatch, objective: PreferenceObjective):
        policy = self._response_logprobs(batch.tokens)
        reference = self._reference_for(batch.tokens, batch.ref_logps, objective)
        mismatched = mismatched_ref = None
        if isinstance(batch, KTOBatch):
            with torch.no_grad():  # z0 is detached: no gradient through the mismatched pairs
                mismatched = self._response_logprobs(batch.mismatched)
            mismatched_ref = self._reference_for(batch.mismatched, batch.ref_mismatched_logps, objective)
        return preference_loss(objective, policy, reference, batch, mismatched, mismatched_ref)

    def train_preference_step(self, micro_batches: list[PreferenceBatch] | list[KTOBatch],
                              global_num_examples: int, objective: PreferenceObjective) -> dict[str, float]:
        """One optimizer step of a DPO-family (or KTO) loss, mean over the global batch's examples.

        KTO's z0 is estimated per micro-batch (TRL all-reduces it over ranks first)."""

        def loss_fn(batch):
            losses, stats = self._preference_losses(batch, objective)
            share = len(losses) / global_num_examples
            return losses.sum() / global_num_examples, {k: float(v) * share for k, v in stats.items()}

        return self.train_engine.optimizer_step(micro_batches, loss_fn)

    @torch.no_grad()
    def eval_preference(self, micro_batches: list[PreferenceBatch] | list[KTOBatch],
                        objective: PreferenceObjective) -> dict[str, float]:
        """Mean loss and stats over the given batches (implicit-reward accuracy etc.)."""
        self.train_engine.engine.eval()
        count = sum(b.num_examples for b in micro_batches)
        totals: dict[str, float] = {}
        for batch in micro_batches:
            losses, stats = self._preference_losses(batch, objective)
            share = len(losses) / count
            for key, value in {"loss": losses.mean(), **stats}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * share
        return totals

    def _response_logprobs(self, tokens: TokenBatch):
        logps = self._token_logprobs(tokens)
        return ResponseLogprobs.from_tokens(logps, tokens.loss_mask[:, 1:].to(logps.device))

    def _reference_for(self, tokens: TokenBatch, precomputed: torch.Tensor | None, objective: PreferenceObjective):
        if not objective.needs_reference:
            return None
        if precomputed is not None:
            return precomputed.to(self.train_engine.device)
        with torch.no_grad(), self._reference_weights() as model:
            logps = self._token_logprobs(tokens, model)
        mask = tokens.loss_mask[:, 1:].to(logps.device)
        return torch.where(mask, logps, torch.zeros_like(logps)).sum(-1)

    def train_policy_gradient_step(self, micro_batches: list[RolloutBatch], global_num_tokens: int,
                                   global_num_seqs: int, objective: PolicyGradientObjective) -> dict[str, float]:
        """One optimizer step of the clipped policy-gradient loss (GRPO family), normalised by the
        optimizer step's global token (or sequence) count over all ranks and micro-batches."""

        def loss_fn(batch: RolloutBatch):
            logps, entropy = self._next_token_outputs(batch.tokens, temperature=objective.temperature,
                                                      with_entropy=True)
            return policy_gradient_objective_loss(objective, logps, entropy, batch, global_num_tokens=global_num_tokens,
                                                  global_num_seqs=global_num_seqs)

        return self.train_engine.optimizer_step(micro_batches, loss_fn)

    @torch.no_grad()
    def token_logprobs(self, micro_batches: list[TokenBatch], reference: bool = False,
                       temperature: float = 1.0) -> list[torch.Tensor]:
        """Per micro-batch, (B, T-1) log-probs of each next token under the current (or, with PEFT,
        reference) weights, at ``temperature`` (pass the sampling temperature for sampled tokens)."""
        self.train_engine.engine.eval()
        with self._reference_weights() if reference else contextlib.nullcontext() as model:
            return [self._token_logprobs(batch, model, temperature).cpu() for batch in micro_batches]

    def export_weight_buckets(self, bucket_bytes: int) -> ExportedWeights:
        """The policy's full weights (LoRA merged in) as object-store refs of numpy buckets with their
        tensors' checksums, from rank 0 (all ranks must call: ZeRO-3 gathers). Other ranks return
        none."""
        state = self.train_engine.full_state_dict(self.rank)
        exported = ExportedWeights([], [])
        if self.rank == 0:
            exported = ExportedWeights.put(merged_named_weights(self.train_engine.module, state, self.spec.peft),
                                           bucket_bytes)
        self.train_engine.barrier()
        return exported

    def export_adapter_buckets(self, bucket_bytes: int) -> ExportedWeights:
        """The LoRA adapter alone (``rollout.lora_sync: adapter``) as object-store refs of numpy buckets
        under PEFT's file names, with checksums and the adapter's config, from rank 0 (all ranks must
        call: ZeRO-3 gathers). Other ranks return none."""
        exported = ExportedWeights([], [])
        with self.train_engine.gathered_state() as state:
            if self.rank == 0:
                tensors, adapter_config = lora_adapter(self.train_engine.module, state)
                exported = ExportedWeights.put(tensors.items(), bucket_bytes, adapter_config)
        self.train_engine.barrier()
        return exported

    # ---- GPU weight transports (rayrl.cuda_transfer) ------------------------------------------
    def _engine_weights(self, state: dict[str, torch.Tensor], bucket_bytes: int, wire_dtype: str | None):
        """The weights as the engine loads them (LoRA merged, on this GPU) and their bucket layouts."""
        weights = dict(merged_named_weights(self.train_engine.module, state, self.spec.peft,
                                            device=self.train_engine.device))
        return weights, plan_buckets(weights.items(), bucket_bytes, getattr(torch, wire_dtype) if wire_dtype else None)

    def share_weights_ipc(self, bucket_bytes: int, wire_dtype: str | None = None) -> list[dict]:
        """Pack the full weights into CUDA buffers on this rank's GPU and return one IPC handle dict
        per bucket (every rank: each rollout engine opens the buffer on its own GPU). The buffers
        stay alive until :meth:`release_shared_weights`."""
        self.release_shared_weights()
        with self.train_engine.gathered_state() as state:
            weights, self._shared_layouts = self._engine_weights(state, bucket_bytes, wire_dtype)
            self._shared_buffers = [pack_bucket(weights, layout, device=self.train_engine.device)
                                    for layout in self._shared_layouts]
        return [{"handles": share_ipc(buf), "layout": layout}
                for buf, layout in zip(self._shared_buffers, self._shared_layouts)]

    def release_shared_weights(self) -> None:
        self._shared_buffers = []
        self._shared_layouts = []

    def weight_broadcast_address(self) -> tuple[str, int]:
        return rendezvous_address()

    def init_weight_broadcast(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the NCCL group with the rollout engines as its rank 0 (other ranks: no-op)."""
        if self.rank == 0:
            self._broadcast = nccl_communicator(host, port, 0, world_size, self.train_engine.device)

    def broadcast_weights(self, bucket_bytes: int, wire_dtype: str | None = None) -> int:
        """Broadcast the full weights to the rollout engines (all ranks call: ZeRO-3 gathers);
        returns the bytes sent (rank 0) or 0."""
        sent = 0
        with self.train_engine.gathered_state() as state:
            if self.rank == 0:
                weights, layouts = self._engine_weights(state, bucket_bytes, wire_dtype)
                for _, layout in broadcast_buckets(self._broadcast, layouts, weights):
                    sent += layout.nbytes
        self.train_engine.barrier()
        return sent

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[TokenBatch], padding: int = 0) -> tuple[float, int]:
        """(sum of NLL over target tokens, number of target tokens) on the given batches, the last
        ``padding`` of them run but not counted (forwards that keep ZeRO-3's ranks in step)."""
        self.train_engine.engine.eval()
        total, count = 0.0, 0
        for batch in micro_batches[:len(micro_batches) - padding]:
            logps = self._token_logprobs(batch)
            mask = batch.loss_mask[:, 1:].to(logps.device)
            total += float(-(logps * mask).sum())
            count += int(mask.sum())
        for batch in micro_batches[len(micro_batches) - padding:]:
            self._token_logprobs(batch)
        return total, count

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                 stop_ids: list[int]) -> list[list[int]]:
        """Greedy completions (token ids, stop token excluded). All ranks must call it under ZeRO-3."""
        self.train_engine.engine.eval()
        module = self.train_engine.module
        device = self.train_engine.device
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
