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

    def row_lengths(self) -> torch.Tensor:
        """(B,) each row's real tokens."""
        return (self.segment_ids > 0).sum(-1)

    def without_targets(self) -> TokenBatch:
        """The same rows with no training target (a forward that contributes nothing to the loss)."""
        return TokenBatch(self.input_ids, torch.zeros_like(self.loss_mask), self.position_ids, self.segment_ids)

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

    def model_inputs(self, device: torch.device, mask_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Keyword inputs of an HF model's forward: ids and the padding mask, or, for packed rows, the
        block-causal mask (``mask_dtype`` as in ``block_causal_mask``) and the restarting position ids."""
        inputs = {"input_ids": self.input_ids.to(device)}
        if self.is_packed:
            inputs["attention_mask"] = self.block_causal_mask(mask_dtype).to(device)
            inputs["position_ids"] = self.position_ids.to(device)
        else:
            inputs["attention_mask"] = self.padding_mask().to(device)
        return inputs

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


@dataclass(frozen=True)
class RowShards:
    """A batch's rows split over data-parallel ranks for a forward-only pass (log-probs, values): each
    rank takes a contiguous shard in micro-batches of at most ``micro_batch_size`` rows, each cut to its
    own longest row. Ranks with fewer micro-batches get padding ones (a copy of row 0, result dropped), so
    every rank runs the same number of forwards: ZeRO-3 gathers each layer's parameters collectively."""

    tokens: TokenBatch
    rows: list[list[slice | None]]  # per rank, per micro-batch: its rows, or None for a padding forward

    @classmethod
    def split(cls, tokens: TokenBatch, world_size: int, micro_batch_size: int, *,
              equal_forwards: bool = True) -> RowShards:
        """``equal_forwards``: pad the ranks to the same number of forwards (off for independent actors)."""
        total = tokens.input_ids.shape[0]
        per_rank = -(-total // world_size)
        rows = [[slice(start, min(start + micro_batch_size, end))
                 for start in range(rank * per_rank, end, micro_batch_size)]
                for rank, end in ((r, min((r + 1) * per_rank, total)) for r in range(world_size))]
        if not equal_forwards:
            return cls(tokens, [micro for micro in rows if micro])
        forwards = max(len(micro) for micro in rows)
        return cls(tokens, [micro + [None] * (forwards - len(micro)) for micro in rows])

    def micro_batches(self, rank: int) -> list[TokenBatch]:
        """What rank ``rank`` computes, in order."""
        out = []
        for rows in self.rows[rank]:
            part = self.tokens.select(slice(0, 1) if rows is None else rows)
            out.append(part.trimmed(part.width))
        return out

    def stitch(self, results: list[list[torch.Tensor]]) -> torch.Tensor:
        """The ranks' per-micro-batch (b, w-1, ...) results as one (N, T-1, ...) tensor in row order; the
        columns past each micro-batch's longest row are 0."""
        first = results[0][0]
        out = first.new_zeros((self.tokens.input_ids.shape[0], self.tokens.input_ids.shape[1] - 1, *first.shape[2:]))
        for rank_rows, rank_results in zip(self.rows, results, strict=True):
            for rows, result in zip(rank_rows, rank_results, strict=True):
                if rows is not None:
                    out[rows, :result.shape[1]] = result
        return out
