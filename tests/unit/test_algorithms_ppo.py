import math

import pytest
import torch

from rayrl.algorithms import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    kl_penalized_rewards,
)


def test_on_policy_nothing_is_clipped_and_loss_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(3, 6, generator=g)).requires_grad_()
    adv = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    loss, stats = clipped_policy_loss(logp, logp.detach(), 5 * adv, mask, eps_low=0.1, eps_high=0.1, dual_clip=3.0)
    assert stats["clip_frac"].item() == 0 and stats["dual_clip_frac"].item() == 0
    assert stats["approx_kl"].item() == 0 and stats["ratio_mean"].item() == pytest.approx(1.0)
    n = mask.sum()
    assert loss.item() == pytest.approx(-(5 * adv)[mask.bool()].sum().item() / n.item(), rel=1e-6)
    loss.backward()  # on-policy gradient: -A / N per valid token
    torch.testing.assert_close(logp.grad, torch.where(mask.bool(), -5 * adv / n, torch.zeros_like(adv)))


@pytest.mark.parametrize(
    "ratio,adv,eps_high,expected_loss,expected_grad,clipped",
    [
        (1.5, 1.0, 0.2, -1.2, 0.0, True),  # too good: capped at 1 + eps, no gradient
        (1.5, 1.0, 0.28, -1.28, 0.0, True),  # DAPO clip-higher
        (0.5, 1.0, 0.2, -0.5, -0.5, False),  # pessimistic side is the unclipped term
        (0.5, -1.0, 0.2, 0.8, 0.0, True),  # bad action already down-weighted: capped at 1 - eps
        (1.5, -1.0, 0.2, 1.5, 1.5, False),
    ],
)
def test_clipping_hand_values(ratio, adv, eps_high, expected_loss, expected_grad, clipped):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, stats = clipped_policy_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1), eps_high=eps_high)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    # d loss / d logp = -A * ratio when unclipped, 0 when clipped
    assert logp.grad.item() == pytest.approx(expected_grad, abs=1e-6)
    assert stats["clip_frac"].item() == float(clipped)


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[5.0, 2.0]])).requires_grad_()
    adv = torch.tensor([[-1.0, -1.0]])
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(1, 2), dual_clip=3.0)
    # ratio 5: max(5, 1.2) = 5 -> capped at 3 (no grad); ratio 2: max(2, 1.2) = 2 < 3 (kept)
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0]]))
    assert stats["dual_clip_frac"].item() == 0.5
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, old, adv, torch.ones(1, 2), dual_clip=0.5)


def test_tis_weights_multiply_the_per_token_loss():
    logp, adv, mask = torch.tensor([[-1.0, -2.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = clipped_policy_loss(logp, logp, adv, mask, tis_weights=w)
    assert loss.item() == pytest.approx(-(0.5 * 1 + 2.0 * 2) / 2)


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    loss, stats = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped v = 0.7 -> 0.49; max = 1. token 1: 1 both ways.
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert stats["vf_clip_frac"].item() == 0.0
    # moving away from old beyond the clip range towards a worse value: clipped term dominates
    v, v_old, ret, m = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1)
    loss2, stats2 = clipped_value_loss(v, v_old, ret, m)
    assert loss2.item() == pytest.approx(0.5 * (2 - 0.2) ** 2) and stats2["vf_clip_frac"].item() == 1.0
    unclipped, _ = clipped_value_loss(v, v_old, ret, m, clip=None)
    assert unclipped.item() == pytest.approx(0.5)


# ---- GAE ---------------------------------------------------------------------------------------


def brute_force_gae(rewards, values, mask, gamma, lam):
    """Discounted sums written out per valid token: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r, v = rewards[b, idx], values[b, idx]
        v_next = torch.cat([v[1:], v.new_zeros(1)])
        delta = r + gamma * v_next - v
        for i, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** l * delta[i + l] for l in range(len(idx) - i))
    return adv


def test_gae_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 7.0]])  # last position is padding with garbage
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    # deltas [0, 0, 0.5]; with lam = 1 the advantages are return - value = 1 - 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


MASKS = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 0, 0],  # prompt tokens before, right padding after
        [1, 1, 0, 0, 1, 1, 0],  # masked tool-output tokens inside the completion
        [1, 0, 0, 0, 0, 0, 0],
    ]
)


def naive_gae(rewards, values, mask, gamma, lam):
    """Every position is a step (TRL-style after zeroing padding): wrong with interior masks."""
    rewards, values = rewards * mask, values * mask
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nv = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * nv - values[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv * mask


def check_gae(gae_fn, gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 7, dtype=torch.float64, generator=g)
    values = torch.randn(4, 7, dtype=torch.float64, generator=g)
    expected = brute_force_gae(rewards, values, MASKS, gamma, lam)
    torch.testing.assert_close(gae_fn(rewards, values, MASKS, gamma, lam), expected)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_equals_brute_force_discounted_sums(gamma, lam):
    check_gae(lambda r, v, m, g, l: gae_advantages(r, v, m, gamma=g, lam=l, whiten=False)[0], gamma, lam)


def test_gae_that_treats_masked_tokens_as_steps_fails_the_same_check():
    with pytest.raises(AssertionError):
        check_gae(naive_gae, 0.9, 0.8)


def test_gae_right_padding_and_whitening():
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    adv, ret = gae_advantages(r, v, MASKS, gamma=0.9, lam=0.8, whiten=False)
    pad = torch.randn(4, 3, generator=g)  # garbage in the extra padding
    m2 = torch.cat([MASKS, torch.zeros(4, 3, dtype=MASKS.dtype)], 1)
    adv2, ret2 = gae_advantages(torch.cat([r, pad], 1), torch.cat([v, pad], 1), m2, gamma=0.9, lam=0.8, whiten=False)
    torch.testing.assert_close(adv2[:, :7], adv)
    torch.testing.assert_close(ret2[:, :7], ret)
    white, _ = gae_advantages(r, v, MASKS, gamma=0.9, lam=0.8)
    sel = white[MASKS.bool()]
    assert abs(sel.mean().item()) < 1e-5 and sel.std().item() == pytest.approx(1.0, abs=1e-4)


def test_kl_penalized_rewards_hand_values():
    logp = torch.full((2, 4), -1.0)
    ref = torch.full((2, 4), -1.1)  # k1 = 0.1 per token
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]])
    rewards = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.05, 1.95, 0.0], [0.0, -0.05, 0.0, -1.05]])
    torch.testing.assert_close(rewards, expected)
    # no valid token: no score
    assert kl_penalized_rewards(torch.tensor([3.0]), logp[:1], ref[:1], torch.zeros(1, 4), kl_coef=0.5).abs().sum() == 0
    k3 = kl_penalized_rewards(torch.zeros(1), logp[:1], ref[:1], torch.ones(1, 4), kl_coef=1.0, kl_kind="k3")
    torch.testing.assert_close(k3, torch.full((1, 4), -(math.exp(-0.1) - 1 + 0.1)))


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=1000)  # error clipped at +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 0.1))
    ctl.update(current_kl=6.0, n_steps=1000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.2 * 1.02)
    ctl.update(current_kl=3.0, n_steps=1000)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.98)


def test_gradcheck_ppo_losses():
    g = torch.Generator().manual_seed(3)
    logp = (-2 * torch.rand(2, 5, dtype=torch.float64, generator=g)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(2, 5, dtype=torch.float64, generator=g)
    adv = torch.randn(2, 5, dtype=torch.float64, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: clipped_policy_loss(x, old, adv, mask, dual_clip=3.0)[0], (logp,))
    vals = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    old_v = vals.detach() + 0.05 * torch.randn(2, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda v: clipped_value_loss(v, old_v, adv, mask)[0], (vals,))
