import math

import pytest
import torch
import torch.nn.functional as F

from rayrl.algorithms import dpo_loss, kto_loss, kto_reference_point, nll_from_logps, orpo_loss, simpo_loss

B = 4


def same_policy_and_ref(seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -10 * torch.rand(B, generator=g), -10 * torch.rand(B, generator=g)
    return pc, pr, pc.clone(), pr.clone()


@pytest.mark.parametrize(
    "loss_type,beta,label_smoothing,expected",
    [
        ("sigmoid", 0.1, 0.0, math.log(2)),
        ("sigmoid", 0.1, 0.2, math.log(2)),  # cDPO
        ("robust", 0.1, 0.2, math.log(2)),
        ("ipo", 0.1, 0.0, 1 / (4 * 0.1**2)),
        ("ipo", 0.5, 0.0, 1 / (4 * 0.5**2)),
        ("hinge", 0.1, 0.0, 1.0),
    ],
)
def test_dpo_family_when_policy_equals_reference(loss_type, beta, label_smoothing, expected):
    losses, stats = dpo_loss(*same_policy_and_ref(), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert losses.shape == (B,)
    torch.testing.assert_close(losses, torch.full((B,), expected))
    assert set(stats) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert all(v.item() == 0 for v in stats.values())


def test_dpo_hand_values_and_stats():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -3.0])
    # h = (pc - rc) - (pr - rr) = [1 - (-1), -1 - 1] = [2, -2]
    h, beta = torch.tensor([2.0, -2.0]), 0.1
    losses, stats = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(losses, F.softplus(-beta * h))
    eps = 0.1
    cdpo = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]
    torch.testing.assert_close(cdpo, (1 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h))
    robust = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)[0]
    torch.testing.assert_close(robust, ((1 - eps) * F.softplus(-beta * h) - eps * F.softplus(beta * h)) / (1 - 2 * eps))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")[0], torch.relu(1 - beta * h))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")[0], (h - 5.0) ** 2)
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(0.1 * (1 + -1) / 2))
    torch.testing.assert_close(stats["rewards/margins"], torch.tensor(0.0))
    assert stats["rewards/accuracies"].item() == 0.5
    # SFT term (RPO): adds weight * chosen NLL per example
    nll = torch.tensor([0.5, 1.5])
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, sft_weight=2.0, chosen_nll=nll)[0], losses + 2 * nll)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, sft_weight=1.0)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)


def check_prefers_chosen(loss_fn):
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -4.0], requires_grad=True)
    loss_fn(pc, pr).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_gradient_pushes_chosen_up_rejected_down(loss_type):
    ref_c, ref_r = torch.tensor([-5.0, -6.0]), torch.tensor([-6.0, -5.0])
    check_prefers_chosen(lambda c, r: dpo_loss(c, r, ref_c, ref_r, loss_type=loss_type, label_smoothing=0.1)[0])
    check_prefers_chosen(lambda c, r: simpo_loss(c / 10, r / 10)[0])
    check_prefers_chosen(lambda c, r: orpo_loss(c / 10, r / 10, torch.zeros(2))[0])
    with pytest.raises(AssertionError):  # chosen and rejected swapped
        check_prefers_chosen(lambda c, r: dpo_loss(r, c, ref_r, ref_c, loss_type=loss_type)[0])


def test_simpo_hand_value_and_trl_gamma():
    avg_c, avg_r = torch.tensor([-1.0]), torch.tensor([-2.0])
    losses, stats = simpo_loss(avg_c, avg_r, beta=2.0, gamma_beta_ratio=0.5)
    # beta * (avg_c - avg_r) - gamma = 2 * 1 - 1 = 1
    torch.testing.assert_close(losses, F.softplus(torch.tensor([-1.0])))
    # TRL CPOTrainer simpo: -logsigmoid(beta * (pi_logratios - simpo_gamma / beta))
    trl = -F.logsigmoid(2.0 * ((avg_c - avg_r) - 0.3 / 2.0))
    torch.testing.assert_close(simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.3)[0], trl)
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(-2.0))


def test_orpo_hand_value_and_matches_trl_formula():
    a_c, a_r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    nll = torch.tensor([0.7])
    losses, stats = orpo_loss(a_c, a_r, nll, beta=0.1)
    # odds(0.5) = 1, odds(0.25) = 1/3: log odds ratio = log 3; log sigmoid(log 3) = log 3/4
    torch.testing.assert_close(losses, nll - 0.1 * math.log(0.75))
    g = torch.Generator().manual_seed(1)
    a_c, a_r = -3 * torch.rand(6, generator=g) - 0.01, -3 * torch.rand(6, generator=g) - 0.01
    trl_log_odds = (a_c - a_r) - (torch.log1p(-torch.exp(a_c)) - torch.log1p(-torch.exp(a_r)))
    torch.testing.assert_close(orpo_loss(a_c, a_r, torch.zeros(6))[0], -0.1 * F.logsigmoid(trl_log_odds))
    # near-certain responses stay finite
    assert torch.isfinite(orpo_loss(torch.tensor([0.0]), torch.tensor([-1e-9]), torch.zeros(1))[0]).all()


def test_nll_from_logps():
    lp = torch.tensor([[-1.0, -3.0, -9.0]])
    torch.testing.assert_close(nll_from_logps(lp, torch.tensor([[1, 1, 0]])), torch.tensor([2.0]))


def test_kto_half_weight_at_zero_reference_point_and_policy_equal_ref():
    logps = torch.tensor([-3.0, -4.0, -5.0, -6.0])
    desirable = torch.tensor([True, False, True, False])
    losses, stats = kto_loss(
        logps, logps.clone(), desirable, reference_point=0.0, desirable_weight=1.5, undesirable_weight=0.8
    )
    torch.testing.assert_close(losses, torch.tensor([0.75, 0.4, 0.75, 0.4]))
    assert stats["num_desirable"].item() == 2 and stats["kl"].item() == 0.0


def test_kto_hand_value_and_detached_reference_point():
    pol = torch.tensor([-2.0, -2.0], requires_grad=True)
    ref = torch.tensor([-3.0, -3.0])  # r = 1
    kl_pol = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl_ref = torch.tensor([-2.0, -2.0])
    z0 = kto_reference_point(kl_pol, kl_ref)  # mean(1, 0) = 0.5
    assert z0.item() == 0.5 and not z0.requires_grad
    losses, _ = kto_loss(pol, ref, torch.tensor([True, False]), reference_point=z0, beta=0.1)
    # beta (r - z0) = 0.1 * (1 - 0.5) = 0.05
    expected = 1 - torch.sigmoid(torch.tensor([0.05, -0.05]))
    torch.testing.assert_close(losses.detach(), expected)
    losses.sum().backward()
    assert kl_pol.grad is None  # no gradient through z0
    assert pol.grad[0] < 0 and pol.grad[1] > 0  # raise desirable, lower undesirable
    # z0 is clamped at 0
    assert kto_reference_point(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0


def test_gradcheck_preference_losses():
    g = torch.Generator().manual_seed(2)
    args = [(-5 * torch.rand(3, dtype=torch.float64, generator=g)).requires_grad_() for _ in range(4)]
    for lt in ("sigmoid", "ipo", "robust"):
        assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, loss_type=lt, label_smoothing=0.1)[0], args)
    c, r = (a / 10 for a in args[:2])
    nll = torch.rand(3, dtype=torch.float64, generator=g, requires_grad=True)
    c, r = c.detach().requires_grad_(), r.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y, n: orpo_loss(x, y, n)[0], (c, r, nll))
    des = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda p, q: kto_loss(p, q, des, reference_point=0.3)[0], (args[0], args[1]))
