"""Critic: one data-parallel rank of the PPO value model, a DeepSpeed engine over an HF token classifier.

The value model is the causal LM backbone with a one-scalar-per-token head
(``AutoModelForTokenClassification(num_labels=1)``), started from the policy's checkpoint (fresh head)
or from the reward model's (its ``score`` head included: both classes name the head alike). Values are
returned aligned with next-token targets like ``PolicyTrainer.token_logprobs``: position t is the
value of the state that predicts token t+1, so (B, T-1).

With ``critic.peft`` (LoRA / DoRA) the backbone is frozen under the adapter and the value head
(``score``) is fully trained (peft ``modules_to_save``); ``all-linear`` never puts an adapter on the head.
"""

from __future__ import annotations

import torch

from rayrl.actors.engine import TrainerRank, TrainerSpec
from rayrl.algorithms.ppo import clipped_value_loss
from rayrl.config import PeftConfig
from rayrl.data.batch import TokenBatch
from rayrl.data.packing import forward_maybe_packed
from rayrl.data.rollout import ValueBatch


def load_value_model(path: str, *, attn_implementation: str = "sdpa", gradient_checkpointing: bool = False):
    from transformers import AutoConfig, AutoModelForTokenClassification  # slow import (transformers)

    # classifier_dropout=0: the head's dropout (0.1 by default) would make training-mode values differ
    # from the rollout-time values they are clipped against.
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(
        path, config=config, torch_dtype=torch.float32, attn_implementation=attn_implementation)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


VALUE_HEAD = "score"  # AutoModelForTokenClassification's head (and the reward model's: same name)
FINAL_CRITIC_DIR = "final_critic"


def apply_value_peft(model: torch.nn.Module, peft: PeftConfig) -> torch.nn.Module:
    """A LoRA / DoRA adapter on the value model's backbone; the value head stays fully trainable.

    peft's token-classification wrapper puts the head in ``modules_to_save``; the head is excluded
    from the adapted modules (``all-linear`` would otherwise pick it, and peft then refuses to
    also save it whole)."""
    from peft import LoraConfig, TaskType, get_peft_model  # slow import (peft), only with critic.peft

    if peft.method not in ("lora", "dora"):
        raise ValueError(f"critic.peft.method={peft.method!r}: the critic supports lora and dora")
    config = LoraConfig(task_type=TaskType.TOKEN_CLS, r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                        target_modules=peft.target_modules, exclude_modules=[VALUE_HEAD],
                        use_dora=peft.method == "dora")
    model = get_peft_model(model, config)
    head = [n for n, p in model.named_parameters() if p.requires_grad and f"{VALUE_HEAD}.modules_to_save" in n]
    if not head:
        raise RuntimeError(f"critic.peft: the value head '{VALUE_HEAD}' is not trainable under the adapter")
    return model


class Critic(TrainerRank):
    """One rank. Call order (TrainerGroup does it): ``address()`` on rank 0, then ``setup(...)`` on all."""

    def __init__(self, spec: TrainerSpec, rank: int, value_clip: float | None = 0.2):
        super().__init__(spec, rank)
        self.value_clip = value_clip

    def build_model(self) -> torch.nn.Module:
        spec = self.spec
        model = load_value_model(spec.model_path, attn_implementation=spec.attn_implementation,
                                 gradient_checkpointing=spec.gradient_checkpointing)
        return apply_value_peft(model, spec.peft) if spec.peft is not None else model

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.train_engine.module.named_parameters() if p.requires_grad]

    def _values(self, tokens: TokenBatch) -> torch.Tensor:
        """(B, T-1): the head's scalar at every position but the last."""
        def values(forward: TokenBatch) -> tuple[torch.Tensor]:
            return (self.train_engine.forward(**forward.model_inputs(self.train_engine.device)).logits[:, :-1, 0].float(),)

        return forward_maybe_packed(tokens, self.spec.packing, values)[0]

    @torch.no_grad()
    def values(self, micro_batches: list[TokenBatch]) -> list[torch.Tensor]:
        """Per micro-batch, (B, T-1) values of each prefix, aligned like log-probs."""
        self.train_engine.engine.eval()
        return [self._values(batch).cpu() for batch in micro_batches]

    def train_value_step(self, micro_batches: list[ValueBatch], global_num_tokens: int,
                         value_clip: float | None = None) -> dict[str, float]:
        """One optimizer step of the clipped value loss, token mean over the optimizer step's global
        completion tokens (all ranks and micro-batches)."""
        clip = self.value_clip if value_clip is None else value_clip

        def loss_fn(batch: ValueBatch):
            device = self.train_engine.device
            values = self._values(batch.tokens)
            mask = batch.tokens.loss_mask[:, 1:].to(device)
            loss, stats = clipped_value_loss(values, batch.old_values.to(device), batch.returns.to(device), mask,
                                             clip=clip, mode="token_mean", global_num_tokens=global_num_tokens)
            share = float(mask.sum()) / global_num_tokens
            return loss, {k: float(v) * share for k, v in stats.items()}

        return self.train_engine.optimizer_step(micro_batches, loss_fn)
