import math

import pytest
import torch
import torch.nn.functional as F

from rayrl.algorithms import reward_model_loss, sft_loss


def test_sft_loss_is_masked_token_mean_nll():
    lp = torch.tensor([[-1.0, -2.0, -50.0], [-3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(2.0)
    assert stats["num_tokens"].item() == 3 and stats["nll"].item() == pytest.approx(2.0)
    # global count: two micro-batches' shares add up to the full-batch mean
    shares = sft_loss(lp[:1], mask[:1], global_num_tokens=3)[0] + sft_loss(lp[1:], mask[1:], global_num_tokens=3)[0]
    assert shares.item() == pytest.approx(2.0)


def test_reward_model_loss_is_ln2_on_equal_scores():
    r = torch.tensor([0.3, -1.2, 4.0])
    loss, stats = reward_model_loss(r, r)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["accuracy"].item() == 0.0 and stats["margin"].item() == 0.0


def test_reward_model_margin_centering_and_stats():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, stats = reward_model_loss(rc, rr, margin=torch.tensor([1.0, 0.0]), center_coef=0.01)
    expected = (F.softplus(torch.tensor(0.0)) + F.softplus(torch.tensor(1.0))) / 2 + 0.01 * (9 + 1) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == 0.0


def check_prefers_chosen(loss_fn):
    rc = torch.tensor([0.5, -0.3], requires_grad=True)
    rr = torch.tensor([0.1, 0.2], requires_grad=True)
    loss_fn(rc, rr).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # descent raises chosen, lowers rejected


def test_gradient_raises_chosen_reward_and_wrong_sign_fails():
    check_prefers_chosen(lambda c, r: reward_model_loss(c, r)[0])
    with pytest.raises(AssertionError):
        check_prefers_chosen(lambda c, r: reward_model_loss(r, c)[0])


def test_gradcheck_reward_model_loss():
    g = torch.Generator().manual_seed(0)
    rc, rr = (torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: reward_model_loss(a, b, margin=0.5, center_coef=0.1)[0], (rc, rr))
