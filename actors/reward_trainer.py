"""RewardModelTrainer: one rank of a Bradley-Terry reward model (a scalar head on a causal LM).

The model is Hugging Face's ``AutoModelForSequenceClassification`` with one label: the reward is the
head's output at the last non-pad token, exactly what the PPO stage's RewardModel actor computes when
it loads the exported model.
"""

from __future__ import annotations

import torch

from rayrl.actors.engine import TrainerRank, TrainerSpec
from rayrl.actors.models import load_model
from rayrl.algorithms import reward_model_loss
from rayrl.data.batch import TokenBatch
from rayrl.data.preference import PreferenceBatch


class RewardModelTrainer(TrainerRank):
    def __init__(self, spec: TrainerSpec, rank: int, pad_token_id: int = 0):
        super().__init__(spec, rank)
        self.pad_token_id = pad_token_id

    def build_model(self) -> torch.nn.Module:
        spec = self.spec
        return load_model(spec.model_path, "reward", attn_implementation=spec.attn_implementation,
                          pad_token_id=self.pad_token_id, peft=spec.peft,
                          gradient_checkpointing=spec.gradient_checkpointing)

    def _rewards(self, tokens: TokenBatch) -> torch.Tensor:
        device = self.train_engine.device
        logits = self.train_engine.forward(input_ids=tokens.input_ids.to(device),
                                           attention_mask=tokens.padding_mask().to(device)).logits
        return logits[:, 0].float()

    def _loss(self, batch: PreferenceBatch, global_num_pairs: int, center_coef: float):
        rewards = self._rewards(batch.tokens)
        half = batch.num_examples
        margin = batch.margins.to(rewards.device) if batch.margins is not None else None
        loss, stats = reward_model_loss(rewards[:half], rewards[half:], margin=margin, center_coef=center_coef,
                                        global_num_pairs=global_num_pairs)
        share = half / global_num_pairs
        named = {"accuracy": stats["accuracy"], "rewards/margins": stats["margin"],
                 "rewards/chosen": stats["chosen"], "rewards/rejected": stats["rejected"]}
        return loss, {k: float(v) * share for k, v in named.items()}

    def train_reward_step(self, micro_batches: list[PreferenceBatch], global_num_pairs: int,
                          center_coef: float) -> dict[str, float]:
        return self.train_engine.optimizer_step(
            micro_batches, lambda batch: self._loss(batch, global_num_pairs, center_coef))

    @torch.no_grad()
    def eval_pairs(self, micro_batches: list[PreferenceBatch], center_coef: float) -> dict[str, float]:
        """Held-out loss and pairwise accuracy (fraction of pairs with r_chosen > r_rejected)."""
        self.train_engine.engine.eval()
        count = sum(b.num_examples for b in micro_batches)
        totals: dict[str, float] = {}
        for batch in micro_batches:
            loss, stats = self._loss(batch, count, center_coef)
            for key, value in {"loss": float(loss), **stats}.items():
                totals[key] = totals.get(key, 0.0) + value
        return totals

    @torch.no_grad()
    def scores(self, tokens: TokenBatch) -> list[float]:
        self.train_engine.engine.eval()
        return self._rewards(tokens).cpu().tolist()
