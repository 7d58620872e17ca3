"""Padding-free forwards for RL: rows of mixed lengths packed several to a row, and micro-batches cut by
token budget and balanced over ranks.

Packing changes only how the forward is laid out. ``RowPacking`` packs a micro-batch's rows into rows no
longer than its longest one (position ids restart per sequence, attention stays within it), and
``unpack`` puts each per-token output back where the padded forward would have had it. The loss then
sees the same (B, T-1) tensors as without packing, so its normalisation is unchanged by construction.

Packed rows are as long as the micro-batch's longest row, not one row per micro-batch: without a
variable-length attention kernel (CPU) attention over a packed row costs its length squared.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayrl.data.batch import TokenBatch, collate


@dataclass(frozen=True)
class RowPacking:
    """Rows of ``source`` packed first-fit-decreasing into ``packed`` rows of at most ``source.width``
    tokens, and where each packed position's next-token output goes back to."""

    packed: TokenBatch
    source_shape: tuple[int, int]  # (B, T) of the unpacked micro-batch
    # Each next-token position of a source row (row, column) and the packed position holding it.
    source_rows: torch.Tensor
    source_columns: torch.Tensor
    packed_rows: torch.Tensor
    packed_columns: torch.Tensor

    @classmethod
    def of(cls, source: TokenBatch) -> RowPacking:
        lengths = (source.segment_ids > 0).sum(-1).tolist()
        capacity = max(lengths)
        order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
        bins: list[list[int]] = []
        loads: list[int] = []
        for row in order:
            fits = next((b for b, load in enumerate(loads) if load + lengths[row] <= capacity), None)
            if fits is None:
                bins.append([row])
                loads.append(lengths[row])
            else:
                bins[fits].append(row)
                loads[fits] += lengths[row]
        rows = []
        src_r, src_c, dst_r, dst_c = [], [], [], []
        for packed_row, members in enumerate(bins):
            ids, mask, pos, seg = [], [], [], []
            for segment, row in enumerate(sorted(members), start=1):
                n = lengths[row]
                offset = len(ids)
                ids += source.input_ids[row, :n].tolist()
                mask += source.loss_mask[row, :n].tolist()
                pos += list(range(n))
                seg += [segment] * n
                # position t predicts token t+1: the row's n-1 next-token outputs
                src_r += [row] * (n - 1)
                src_c += range(n - 1)
                dst_r += [packed_row] * (n - 1)
                dst_c += range(offset, offset + n - 1)
            rows.append((ids, mask, pos, seg))
        # Padding holds token 0: any valid id does, it is attended by nothing and its outputs are dropped.
        src_r, src_c, dst_r, dst_c = (torch.tensor(index, dtype=torch.long) for index in (src_r, src_c, dst_r, dst_c))
        return cls(collate(rows, 0), tuple(source.input_ids.shape), src_r, src_c, dst_r, dst_c)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(R, W-1, ...) per-position outputs of the packed forward (position t: about token t+1) as
        (B, T-1, ...) in the source rows' layout; 0 where the source row has no next token.
        Differentiable: the gradient flows back to the packed positions."""
        index = (self.packed_rows.to(values.device), self.packed_columns.to(values.device))
        out = values.new_zeros((self.source_shape[0], self.source_shape[1] - 1, *values.shape[2:]))
        return out.index_put((self.source_rows.to(values.device), self.source_columns.to(values.device)),
                             values[index])


def forward_maybe_packed(batch: TokenBatch, pack: bool,
                         forward: Callable[[TokenBatch], tuple[torch.Tensor | None, ...]]
                         ) -> tuple[torch.Tensor | None, ...]:
    """``forward``'s per-position outputs ((rows, width - 1, ...) tensors, or None) for ``batch``: run on its
    rows packed if ``pack`` (and they are not packed already), and put back in ``batch``'s own layout."""
    packing = RowPacking.of(batch) if pack and not batch.is_packed else None
    outputs = forward(batch if packing is None else packing.packed)
    if packing is None:
        return outputs
    return tuple(None if output is None else packing.unpack(output) for output in outputs)


def balanced_micro_batches(lengths: list[int], world_size: int, max_tokens: int) -> list[list[list[int]]]:
    """Positions 0..len(lengths)-1 split over ``world_size`` ranks and into micro-batches of at most
    ``max_tokens`` tokens, every rank the same number of micro-batches (ZeRO-3 runs forwards in step
    over ranks; a micro-batch may be empty when there are fewer sequences than micro-batches).

    Longest-processing-time first over all ranks' micro-batches at once, so the ranks' and the
    micro-batches' token counts come out close: ranks finish together. Starts at the fewest
    micro-batches the budget allows and adds one per rank until every one fits."""
    if any(n > max_tokens for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens is over the micro-batch budget of {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    per_rank = max(1, -(-sum(lengths) // (world_size * max_tokens)))
    while True:
        count = per_rank * world_size
        loads = [(0, b) for b in range(count)]  # a heap of (tokens, micro-batch)
        members: list[list[int]] = [[] for _ in range(count)]
        for i in order:
            load, b = heapq.heappop(loads)
            members[b].append(i)
            heapq.heappush(loads, (load + lengths[i], b))
        if max(load for load, _ in loads) <= max_tokens:
            break
        per_rank += 1
    # Deal the micro-batches out heaviest first, each to the lightest rank that still has room.
    totals = [sum(lengths[i] for i in m) for m in members]
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    rank_loads = [0] * world_size
    for b in sorted(range(count), key=lambda b: -totals[b]):
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: rank_loads[r])
        ranks[rank].append(sorted(members[b]))
        rank_loads[rank] += totals[b]
    return ranks
