"""Off-policy corrections (rayrl.algorithms.off_policy) against hand-computed weights."""

import math

import pytest
import torch

from rayrl.algorithms import off_policy_weights, policy_gradient_loss

# rho = pi_prox / mu per token: 1, e^0.5, e^1 (> cap 2), e^-1 (< 1/2), and a masked position
PROXIMAL = torch.tensor([[-1.0, -1.0, -1.0, -2.0, -1.0]])
BEHAVIOUR = torch.tensor([[-1.0, -1.5, -2.0, -1.0, 40.0]])
MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_none_is_no_weight():
    assert off_policy_weights("none", PROXIMAL, BEHAVIOUR, MASK) is None


def test_truncated_importance_sampling():
    w = off_policy_weights("tis", PROXIMAL, BEHAVIOUR, MASK, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 2.0, math.exp(-1.0), 0.0]]))


def test_masked_importance_sampling_keeps_tokens_inside_the_band_unweighted():
    w = off_policy_weights("mis", PROXIMAL, BEHAVIOUR, MASK, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]))


def test_decoupled_weights_are_the_full_ratio_dropped_above_the_cap():
    w = off_policy_weights("decoupled", PROXIMAL, BEHAVIOUR, MASK, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 0.0, math.exp(-1.0), 0.0]]))


@pytest.mark.parametrize("kind", ["tis", "mis", "decoupled"])
def test_on_policy_samples_get_weight_one(kind):
    """Behaviour == proximal (sync RL, exact engine): every correction is the identity."""
    w = off_policy_weights(kind, PROXIMAL, PROXIMAL.clone(), torch.ones(1, 5))
    torch.testing.assert_close(w, torch.ones(1, 5))


def test_weights_are_detached_and_never_overflow():
    proximal = torch.tensor([[0.0, -1.0]], requires_grad=True)
    behaviour = torch.tensor([[-1000.0, -1.0]])
    for kind in ("tis", "mis", "decoupled"):
        w = off_policy_weights(kind, proximal, behaviour, torch.ones(1, 2))
        assert not w.requires_grad and torch.isfinite(w).all()


def test_decoupled_loss_by_hand():
    """One token, A = 1, pi_theta = pi_prox (r = 1, unclipped), rho = e^0.5: loss = -rho (token mean)."""
    proximal = torch.tensor([[-1.0]])
    logp = proximal.clone().requires_grad_()
    w = off_policy_weights("decoupled", proximal, torch.tensor([[-1.5]]), torch.ones(1, 1), cap=2.0)
    loss, _ = policy_gradient_loss(logp, proximal, torch.tensor([1.0]), torch.ones(1, 1), tis_weights=w)
    torch.testing.assert_close(loss, torch.tensor(-math.exp(0.5)))
    loss.backward()  # d/dlogp of -rho * exp(logp - prox) at logp = prox: -rho
    torch.testing.assert_close(logp.grad, torch.tensor([[-math.exp(0.5)]]))


def test_unknown_kind_and_bad_cap():
    with pytest.raises(ValueError, match="unknown off-policy correction"):
        off_policy_weights("icepop", PROXIMAL, BEHAVIOUR, MASK)
    with pytest.raises(ValueError, match="must be > 1"):
        off_policy_weights("tis", PROXIMAL, BEHAVIOUR, MASK, cap=1.0)
