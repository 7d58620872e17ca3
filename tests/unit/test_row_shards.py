"""Data-parallel forward passes: a batch's rows split over ranks and stitched back in order."""
from __future__ import annotations

import pytest
import torch

from rayrl.data.batch import RowShards
from rayrl.data.rollout import completion_tokens


def _tokens(lengths):
    prompts = [[1, 2]] * len(lengths)
    completions = [[3 + i % 5] * n for i, n in enumerate(lengths)]
    tokens, _ = completion_tokens(prompts, completions, [[0.0] * n for n in lengths], 0)
    return tokens


def _per_row(batch):
    """A stand-in forward: each position's token id plus 100 x its column, (B, T-1)."""
    return (batch.input_ids[:, 1:] + 100 * torch.arange(batch.input_ids.shape[1] - 1)).float()


@pytest.mark.parametrize("rows, world, micro", [(16, 1, 4), (16, 2, 4), (16, 2, 3), (5, 2, 2), (3, 4, 2), (7, 3, 8)])
def test_shards_cover_every_row_once_with_equal_forwards_and_stitch_in_order(rows, world, micro):
    lengths = [(7 * i) % 9 + 1 for i in range(rows)]
    tokens = _tokens(lengths)
    shards = RowShards.split(tokens, world, micro)
    assert len({len(rank) for rank in shards.rows}) == 1  # every rank runs the same number of forwards
    covered = [i for rank in shards.rows for part in rank if part is not None for i in range(rows)[part]]
    assert covered == list(range(rows))
    assert all(part is None or part.stop - part.start <= micro for rank in shards.rows for part in rank)
    results = [[_per_row(batch) for batch in shards.micro_batches(rank)] for rank in range(world)]
    for rank in range(world):  # each micro-batch is cut to its own longest row
        for part, batch in zip(shards.rows[rank], shards.micro_batches(rank)):
            assert batch.width == batch.input_ids.shape[1]
    stitched = shards.stitch(results)
    mask = tokens.loss_mask[:, 1:]
    assert stitched.shape == mask.shape
    assert torch.equal(stitched * mask, _per_row(tokens) * mask)


def test_independent_actors_get_no_padding_forwards():
    tokens = _tokens([3, 1, 4, 1, 5])
    shards = RowShards.split(tokens, 2, 2, equal_forwards=False)
    assert shards.rows == [[slice(0, 2), slice(2, 3)], [slice(3, 5)]]
    assert len(RowShards.split(_tokens([2, 2]), 4, 1, equal_forwards=False).rows) == 2  # no empty shards
    results = [[_per_row(b) for b in shards.micro_batches(i)] for i in range(2)]
    mask = tokens.loss_mask[:, 1:]
    assert torch.equal(shards.stitch(results) * mask, _per_row(tokens) * mask)


def test_contiguous_shares():
    from rayrl.trainer_group import contiguous_shares

    assert contiguous_shares(5, 2) == [range(0, 3), range(3, 5)]
    assert contiguous_shares(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]
    assert [i for share in contiguous_shares(17, 4) for i in share] == list(range(17))
