import pytest
import torch

from rayrl.algorithms import (
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_whiten,
    num_tokens_and_seqs,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # last row fully masked


def test_masked_reductions_hand_values():
    assert masked_sum(VALUES, MASK).item() == 10.0
    assert masked_mean(VALUES, MASK).item() == 2.5
    torch.testing.assert_close(masked_mean(VALUES, MASK, dim=-1), torch.tensor([2.0, 4.0, 0.0]))  # empty row -> 0
    nan_pad = torch.where(MASK.bool(), VALUES, torch.nan)
    assert masked_mean(nan_pad, MASK).item() == 2.5  # padding content never leaks


def test_masked_whiten():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 6, dtype=torch.float64, generator=g) * 3 + 5
    m = torch.rand(4, 6, generator=g) > 0.3
    w = masked_whiten(v, m)
    sel = w[m]
    torch.testing.assert_close(sel.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(sel.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w[~m] == 0).all()
    kept = masked_whiten(v, m, shift_mean=False)[m]
    torch.testing.assert_close(kept.mean(), v[m].mean())


def test_aggregate_modes_hand_values():
    assert aggregate_loss(VALUES, MASK, mode="token_mean").item() == 2.5  # (1+2+3+4)/4
    # row means 2 and 4; the fully-masked row does not count as a sequence
    assert aggregate_loss(VALUES, MASK, mode="seq_mean_token_mean").item() == 3.0
    # Dr. GRPO: row sums 6 and 4 over C=4, mean over 2 sequences
    assert aggregate_loss(VALUES, MASK, mode="seq_mean_token_sum_norm", norm_constant=4).item() == 1.25
    with pytest.raises(ValueError):
        aggregate_loss(VALUES, MASK, mode="seq_mean_token_sum_norm")
    with pytest.raises(ValueError):
        aggregate_loss(VALUES, MASK, mode="bogus")
    n_tok, n_seq = num_tokens_and_seqs(MASK)
    assert (n_tok.item(), n_seq.item()) == (4, 2)


def test_empty_microbatch_gives_zero_not_nan():
    v = torch.ones(2, 3, requires_grad=True)
    m = torch.zeros(2, 3)
    for mode in ("token_mean", "seq_mean_token_mean"):
        loss = aggregate_loss(v, m, mode=mode)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(v.grad).all()


# ---- gradient accumulation / data parallelism -------------------------------------------------

MAX_NEW = 12


def make_batch(n_seqs, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_seqs, MAX_NEW, 5, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, MAX_NEW + 1, (n_seqs,), generator=g)
    lengths[0] = MAX_NEW  # lengths differ a lot across micro-batches
    lengths[1] = 1
    lengths[3] = 0  # a fully masked row (e.g. an overlong-filtered completion)
    mask = torch.arange(MAX_NEW).unsqueeze(0) < lengths.unsqueeze(1)
    return feats, mask


def per_token_loss(theta, feats):
    return torch.tanh(feats @ theta) ** 2 + feats[..., 0] * theta[0]


def trim(feats, mask):
    """Dynamic padding: each micro-batch is padded only to its own longest row."""
    t = int(mask.sum(-1).max())
    return feats[:, :t], mask[:, :t]


def full_batch_grad(theta, feats, mask, mode):
    loss = aggregate_loss(per_token_loss(theta, feats), mask, mode=mode, norm_constant=MAX_NEW)
    return torch.autograd.grad(loss, theta)[0]


def accumulated_grad(theta, feats, mask, mode, ranks, micro, loss_fn):
    """Sum over simulated ranks (an all-reduce SUM) of gradients accumulated over micro-batches."""
    n_tok, n_seq = num_tokens_and_seqs(mask)  # step-wide counts: all micro-batches, all ranks
    total = torch.zeros_like(theta)
    for rank_feats, rank_mask in zip(feats.chunk(ranks), mask.chunk(ranks)):
        for f, m in zip(rank_feats.chunk(micro), rank_mask.chunk(micro)):
            f, m = trim(f, m)
            loss = loss_fn(per_token_loss(theta, f), m, mode, n_tok, n_seq, micro)
            (g,) = torch.autograd.grad(loss, theta)
            total += g
    return total


def global_share(values, mask, mode, n_tok, n_seq, micro):
    return aggregate_loss(
        values, mask, mode=mode, global_num_tokens=n_tok, global_num_seqs=n_seq, norm_constant=MAX_NEW
    )


def local_mean_over_steps(values, mask, mode, n_tok, n_seq, micro):
    # The usual mistake: local mean, divided by the number of accumulation steps.
    return aggregate_loss(values, mask, mode=mode, norm_constant=MAX_NEW) / micro


def local_padded_length_norm(values, mask, mode, n_tok, n_seq, micro):
    # Dr. GRPO mistake: normalise by the micro-batch's padded length instead of a constant.
    return aggregate_loss(
        values, mask, mode=mode, global_num_tokens=n_tok, global_num_seqs=n_seq, norm_constant=mask.shape[-1]
    )


MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def check_accumulation(mode, n_seqs, ranks, micro, loss_fn):
    feats, mask = make_batch(n_seqs)
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        accumulated_grad(theta, feats, mask, mode, ranks, micro, loss_fn), full_batch_grad(theta, feats, mask, mode)
    )


@pytest.mark.parametrize("mode", MODES)
def test_one_microbatch_of_8_equals_8_microbatches_of_1(mode):
    check_accumulation(mode, n_seqs=8, ranks=1, micro=8, loss_fn=global_share)


@pytest.mark.parametrize("mode", MODES)
def test_2_ranks_x_4_microbatches_equals_full_batch(mode):
    check_accumulation(mode, n_seqs=16, ranks=2, micro=4, loss_fn=global_share)


@pytest.mark.parametrize("mode", MODES)
def test_local_mean_per_microbatch_fails_the_same_check(mode):
    # token_mean: micro-batches hold different token counts. Seq modes: one micro-batch holds no
    # valid sequence (row 3), so a local mean / M under-weights the others.
    with pytest.raises(AssertionError):
        check_accumulation(mode, n_seqs=8, ranks=1, micro=8, loss_fn=local_mean_over_steps)


def test_padded_length_normalisation_fails_the_same_check():
    with pytest.raises(AssertionError):
        check_accumulation("seq_mean_token_sum_norm", n_seqs=8, ranks=1, micro=8, loss_fn=local_padded_length_norm)


def test_global_shares_sum_to_the_full_batch_loss():
    feats, mask = make_batch(8, seed=1)
    values = per_token_loss(torch.ones(5, dtype=torch.float64), feats)
    n_tok, n_seq = num_tokens_and_seqs(mask)
    for mode in MODES:
        shares = sum(
            global_share(v, m, mode, n_tok, n_seq, 4) for v, m in zip(values.chunk(4), mask.chunk(4))
        )
        torch.testing.assert_close(shares, aggregate_loss(values, mask, mode=mode, norm_constant=MAX_NEW))
