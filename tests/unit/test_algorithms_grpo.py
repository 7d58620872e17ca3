import math

import pytest
import torch

from rayrl.algorithms import (
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    masked_mean,
    overlong_mask,
    policy_gradient_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    truncated_is_weights,
)

G = 4
REWARDS = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0, 1.0, 5.0, -3.0, 0.5], dtype=torch.float64)


def check_zero_sum_per_group(adv_fn):
    adv = adv_fn(REWARDS, G).view(-1, G)
    torch.testing.assert_close(adv.sum(-1), torch.zeros(3, dtype=torch.float64))
    assert (adv[1] == 0).all()  # the group of equal rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_sum_to_zero_and_equal_rewards_get_zero(scale):
    check_zero_sum_per_group(lambda r, g: group_advantages(r, g, scale=scale))


def test_rloo_advantages_sum_to_zero_per_group():
    check_zero_sum_per_group(rloo_advantages)


@pytest.mark.parametrize("value,size", [(0.7, 7), (0.3, 8), (0.1, 8)])
@pytest.mark.parametrize("adv_fn", [group_advantages, rloo_advantages,
                                    lambda r, g: group_advantages(r, g, scale="none")])
def test_float32_groups_of_equal_partial_credit_get_exactly_zero(value, size, adv_fn):
    """In float32, 0.7 - mean([0.7] * 7) is not 0; divided by a zero std + eps it was 0.056."""
    rewards = torch.cat([torch.full((size,), value), torch.arange(size, dtype=torch.float32)])
    adv = adv_fn(rewards, size)
    assert adv.dtype == torch.float32
    assert (adv[:size] == 0).all()
    assert adv[size:].abs().sum() > 0


def test_batch_mean_baseline_fails_the_same_check():
    wrong = lambda r, g: (r - r.mean()) / (r.std() + 1e-6)  # noqa: E731  batch mean, not group mean
    with pytest.raises(AssertionError):
        check_zero_sum_per_group(wrong)


def test_group_advantages_hand_values():
    r = torch.tensor([0.0, 1.0, 3.0, 3.0])
    s = 1 / math.sqrt(2)  # unbiased std of {0, 1}
    s += 1e-6  # eps
    torch.testing.assert_close(group_advantages(r, 2), torch.tensor([-0.5 / s, 0.5 / s, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(r, 2, scale="none"), torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    batch_scaled = torch.tensor([-0.5, 0.5, 0.0, 0.0]) / r.std()
    torch.testing.assert_close(group_advantages(r, 2, scale="batch", eps=0.0), batch_scaled)
    assert torch.isfinite(group_advantages(r, 2, eps=0.0)[:2]).all()
    with pytest.raises(ValueError):
        group_advantages(r, 3)
    with pytest.raises(ValueError):
        group_advantages(r, 1)


def test_rloo_hand_example():
    # baseline of each sample is the mean of the other three
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4)
    torch.testing.assert_close(adv, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]))


def test_reinforce_pp_returns_and_global_whitening():
    token_rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = reinforce_pp_advantages(token_rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    sel = adv[mask.bool()]
    assert abs(sel.mean().item()) < 1e-6 and sel.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (adv[~mask.bool()] == 0).all()


def batch(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -2 * torch.rand(B, T, dtype=torch.float64, generator=g)
    logp = (old + 0.3 * torch.randn(B, T, dtype=torch.float64, generator=g)).requires_grad_()
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1] * T, [1] * (T - 2) + [0] * 2, [1, 1] + [0] * (T - 2)])[:B]
    return logp, old, adv, mask


def test_token_level_equals_ppo_loss_with_broadcast_advantages():
    logp, old, adv, mask = batch()
    a, sa = policy_gradient_loss(logp, old, adv, mask, eps_high=0.28)
    b, sb = clipped_policy_loss(logp, old, adv.unsqueeze(-1).expand_as(logp), mask, eps_high=0.28)
    torch.testing.assert_close(a, b)
    assert sa.keys() == sb.keys()


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_no_token_is_clipped(ratio_level):
    logp, _, adv, mask = batch(1)
    loss, stats = policy_gradient_loss(
        logp, logp.detach(), 10 * adv, mask, ratio_level=ratio_level, eps_low=1e-4, eps_high=1e-4
    )
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == pytest.approx(1.0)
    expected = aggregate_loss(-(10 * adv).unsqueeze(-1).expand_as(logp), mask)
    torch.testing.assert_close(loss, expected)


def gspo_reference(logp, old, adv, mask, eps_low, eps_high):
    """GSPO as written in the paper: one ratio per sequence, mean over sequences."""
    s = torch.exp(masked_mean(logp - old, mask, dim=-1))
    return -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).mean()


def check_gspo(loss_fn):
    logp, old, adv, mask = batch(2)
    ours = loss_fn(logp, old, adv, mask)
    ref = gspo_reference(logp, old, adv, mask, 0.2, 0.2)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logp)[0], torch.autograd.grad(ref, logp)[0])


def test_gspo_sequence_ratio_matches_paper_value_and_gradient():
    check_gspo(lambda *a: policy_gradient_loss(*a, ratio_level="sequence", mode="seq_mean_token_mean")[0])
    logp, old, adv, mask = batch(2)
    _, stats = policy_gradient_loss(logp, old, adv, mask, ratio_level="sequence")
    geo = torch.exp(masked_mean(logp.detach() - old, mask, dim=-1))  # geometric-mean ratio per sequence
    torch.testing.assert_close(stats["ratio_mean"], masked_mean(geo.unsqueeze(-1).expand_as(old), mask))


def test_token_level_ratio_fails_the_gspo_check():
    with pytest.raises(AssertionError):
        check_gspo(lambda *a: policy_gradient_loss(*a, ratio_level="token", mode="seq_mean_token_mean")[0])


def test_gspo_clips_whole_sequences():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[2.0, 1.0, 1.0]])).requires_grad_()  # token ratios 2, 1, 1
    loss, stats = policy_gradient_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), ratio_level="sequence")
    # s = 2^(1/3) = 1.26 > 1.2: every token of the sequence is clipped, no gradient
    assert stats["clip_frac"].item() == 1.0
    loss.backward()
    assert (logp.grad == 0).all()


def test_truncated_is_weights():
    trainer = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.0, -1.5, -3.0, 50.0]])
    w = truncated_is_weights(trainer, sampler, torch.tensor([[1, 1, 1, 0]]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 2.0, 0.0]]))
    assert not w.requires_grad
    logp, old, adv, mask = batch(3)
    tis = torch.full_like(old, 0.5)
    a = policy_gradient_loss(logp, old, adv, mask, tis_weights=tis)[0]
    torch.testing.assert_close(a, 0.5 * policy_gradient_loss(logp, old, adv, mask)[0])


def test_kl_term():
    logp, old, adv, mask = batch(4)
    base = policy_gradient_loss(logp, old, adv, mask)[0]
    same, stats = policy_gradient_loss(logp, old, adv, mask, ref_logp=logp.detach(), kl_coef=0.1)
    torch.testing.assert_close(same, base)
    assert stats["kl"].item() == 0.0
    ref = old - 0.2
    with_kl, stats = policy_gradient_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    lr = ref - logp
    k3 = torch.exp(lr) - lr - 1
    torch.testing.assert_close(with_kl, base + 0.1 * aggregate_loss(k3, mask))
    with pytest.raises(ValueError):
        policy_gradient_loss(logp, old, adv, mask, kl_coef=0.1)


def test_overlong_mask_drops_rows_and_they_do_not_count():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = overlong_mask(torch.tensor([False, True, False]), mask)
    torch.testing.assert_close(out, torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]]))
    assert out.dtype == mask.dtype
    vals = torch.tensor([[1.0, 3.0, 9.0], [9.0, 9.0, 9.0], [4.0, 9.0, 9.0]])
    assert aggregate_loss(vals, out, mode="seq_mean_token_mean").item() == 3.0  # (2 + 4) / 2


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_gradcheck_policy_gradient_loss(ratio_level):
    logp, old, adv, mask = batch(5)
    ref = old - 0.1
    # GSPO-token's stop-gradient form is only the derivative of its value when every token of a
    # sequence has the same weight, so TIS weights are checked at token level only.
    tis = torch.rand(old.shape, dtype=torch.float64) if ratio_level == "token" else None
    fn = lambda x: policy_gradient_loss(  # noqa: E731
        x, old, adv, mask, ratio_level=ratio_level, eps_low=10.0, eps_high=10.0, ref_logp=ref, kl_coef=0.1,
        tis_weights=tis, mode="seq_mean_token_sum_norm", norm_constant=6,
    )[0]
    assert torch.autograd.gradcheck(fn, (logp,))


def test_overlong_penalty_hand_values():
    """DAPO eq. 13 with L_max 20, L_cache 4: free up to 16 tokens, then -1/4 per token, -1 past 20."""
    from rayrl.algorithms import overlong_penalty

    lengths = torch.tensor([3, 16, 17, 18, 20, 21])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer must be in"):
        overlong_penalty(lengths, 20, 0)


def test_excluded_completions_leave_the_group_statistics():
    """rewards[i].on_failure: exclude. Group [1, 0, (5), 0.5] with the 5 excluded: mean 0.5, unbiased std
    0.5 over the other three: advantages [1, -1, 0, 0]; RLOO over k=3: (3 r_i - 1.5) / 2."""
    rewards = torch.tensor([1.0, 0.0, 5.0, 0.5, 2.0, 7.0, 3.0, 3.0], dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, False, True, False, False])
    adv = group_advantages(rewards, 4, valid=valid)
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert (adv[4:] == 0).all()  # one valid completion: no baseline, no signal
    # the same as the group of the valid ones alone
    torch.testing.assert_close(adv[torch.tensor([0, 1, 3])],
                               group_advantages(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), 3))
    loo = rloo_advantages(rewards, 4, valid=valid)
    torch.testing.assert_close(loo, torch.tensor([0.75, -0.75, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    none = group_advantages(rewards, 4, scale="none", valid=valid)
    assert float(none[valid].sum()) == pytest.approx(0.0) and none[2] == 0
    batch = group_advantages(rewards, 4, scale="batch", valid=valid)
    torch.testing.assert_close(batch[:4], none[:4] / (rewards[valid].std() + 1e-6))
    # all valid: exactly the plain estimators
    everyone = torch.ones(8, dtype=torch.bool)
    assert torch.equal(group_advantages(rewards, 4, valid=everyone), group_advantages(rewards, 4))
    assert torch.equal(rloo_advantages(rewards, 4, valid=everyone), rloo_advantages(rewards, 4))
