"""Typed token batches: what the driver hands a trainer rank for one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBatch:
    """A right-padded micro-batch of token rows (one example per row, or several when packed)."""

    input_ids: torch.Tensor  # (B, T) int64; pad positions hold the pad id
    loss_mask: torch.Tensor  # (B, T) bool; True where the token is a training target
    position_ids: torch.Tensor  # (B, T) int64; restart at 0 for every packed example
    segment_ids: torch.Tensor  # (B, T) int64; 1..k = example within the row, 0 = padding

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens: what a forward/backward actually processes."""
        return int((self.segment_ids > 0).sum())

    @property
    def num_loss_tokens(self) -> int:
        """Target tokens after the one-position shift of next-token prediction."""
        return int(self.loss_mask[:, 1:].sum())

    @property
    def is_packed(self) -> bool:
        return bool((self.segment_ids > 1).any())

    def select(self, rows: torch.Tensor | slice) -> TokenBatch:
        """The rows ``rows`` (an index tensor or a slice), every field alike."""
        return TokenBatch(self.input_ids[rows], self.loss_mask[rows], self.position_ids[rows], self.segment_ids[rows])

    @property
    def width(self) -> int:
        """The longest row's real length: the columns after it are padding in every row."""
        return int((self.segment_ids > 0).sum(-1).max())

    def trimmed(self, width: int) -> TokenBatch:
        """The first ``width`` columns (cut padding that no row needs: less work per forward)."""
        return TokenBatch(self.input_ids[:, :width], self.loss_mask[:, :width], self.position_ids[:, :width],
                          self.segment_ids[:, :width])

    def padding_mask(self) -> torch.Tensor:
        """(B, T) int64 HF-style attention mask: 1 for real tokens, 0 for padding."""
        return (self.segment_ids > 0).long()

    def block_causal_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, T, T) mask: causal within each packed example, nothing across examples.

        Bool (True = attend) for SDPA; pass a float ``dtype`` for an additive mask (eager attention).
        Padding rows attend to themselves only, so no softmax row is empty (which would give NaN).
        """
        seg = self.segment_ids
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=seg.device)
        allowed = allowed[:, None]
        if dtype is None or dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def collate(rows: list[tuple[list[int], list[bool], list[int], list[int]]], pad_id: int) -> TokenBatch:
    """Right-pad rows of (ids, loss_mask, position_ids, segment_ids) into a TokenBatch."""
    length = max(len(ids) for ids, *_ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.bool)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    segment_ids = torch.zeros((batch, length), dtype=torch.long)
    for i, (ids, mask, pos, seg) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        loss_mask[i, :n] = torch.tensor(mask)
        position_ids[i, :n] = torch.tensor(pos)
        segment_ids[i, :n] = torch.tensor(seg)
    return TokenBatch(input_ids, loss_mask, position_ids, segment_ids)
