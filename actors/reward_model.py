"""RewardModel: frozen scores of (prompt + completion) sequences from the reward-model stage's export.

The rm stage exports an ``AutoModelForSequenceClassification`` with one label; the reward is
``.logits[:, 0]`` of the right-padded batch (HF picks the last non-pad token via the model's
``pad_token_id``), exactly what ``RewardModelTrainer`` trained.
"""

from __future__ import annotations

import torch


class RewardModel:
    def __init__(self, model_path: str, *, pad_token_id: int | None = None, num_threads: int = 1,
                 batch_size: int = 32, attn_implementation: str = "sdpa"):
        from transformers import AutoModelForSequenceClassification  # slow import (transformers)

        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, torch_dtype=torch.float32, attn_implementation=attn_implementation)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad_token_id
        self.pad_token_id = self.model.config.pad_token_id
        if self.pad_token_id is None:
            raise ValueError(f"reward model {model_path}: no pad_token_id in its config; pass one")
        self.batch_size = batch_size
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[float]:
        """One scalar per token-id sequence (prompt + completion), in order."""
        out: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            rows = sequences[start:start + self.batch_size]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):  # right padding, as the reward trainer's batches
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                attention[i, :len(row)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out
