import math

import pytest
import torch

from rayrl.algorithms import entropy_from_logits, sequence_logprobs, token_logprobs


def upcast(logits):
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def naive_logprobs(logits, tokens, temperature=1.0):
    return torch.log_softmax(upcast(logits) / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(upcast(logits) / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def assert_matches_naive(fn, logits, tokens, temperature, atol):
    expected = naive_logprobs(logits, tokens, temperature)
    torch.testing.assert_close(fn(logits, tokens, temperature), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_token_logprobs_equals_gather_of_log_softmax(temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 19, 41, generator=g)
    tokens = torch.randint(0, 41, (3, 19), generator=g)
    out = token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (3, 19)
    ours = lambda l, t, tau: token_logprobs(l, t, temperature=tau, chunk_size=chunk_size)  # noqa: E731
    assert_matches_naive(ours, logits, tokens, temperature, 1e-5)


def test_ignoring_temperature_fails_the_same_check():
    g = torch.Generator().manual_seed(1)
    logits, tokens = 3 * torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    wrong = lambda l, t, tau: token_logprobs(l, t)  # noqa: E731  forgets the sampling temperature
    with pytest.raises(AssertionError):
        assert_matches_naive(wrong, logits, tokens, 0.7, 1e-5)


def test_bf16_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(2, 9, 300, generator=g)).bfloat16().requires_grad_()
    tokens = torch.randint(0, 300, (2, 9), generator=g)
    out = token_logprobs(logits, tokens, temperature=0.8, chunk_size=4)
    assert out.dtype == torch.float32
    ref_logits = logits.detach().float().requires_grad_()
    ref = naive_logprobs(ref_logits, tokens, 0.8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    w = torch.randn(2, 9, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_gradient_matches_naive_on_shifted_view(temperature):
    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, 13, 17, dtype=torch.float64, generator=g, requires_grad=True)
    logits = full[:, :-1]  # the usual causal shift: a non-contiguous view
    tokens = torch.randint(0, 17, (2, 12), generator=g)
    w = torch.randn(2, 12, dtype=torch.float64, generator=g)
    ours_lp = token_logprobs(logits, tokens, temperature=temperature, chunk_size=5)
    (ours,) = torch.autograd.grad((ours_lp * w).sum(), full)
    ref_lp = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (ref,) = torch.autograd.grad((ref_lp * w).sum(), full)
    torch.testing.assert_close(ours, ref)


def test_gradcheck_token_logprobs_and_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, temperature=0.7, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, temperature=1.3, chunk_size=3), (logits,))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_matches_naive(temperature):
    g = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(3, 10, 50, dtype=torch.float64, generator=g)
    ours = entropy_from_logits(logits, temperature=temperature, chunk_size=4)
    torch.testing.assert_close(ours, naive_entropy(logits, temperature))
    # bf16 logits: float32 result and a gradient close to the float32 one
    lb = logits.bfloat16().requires_grad_()
    lf = lb.detach().float().requires_grad_()
    hb, hf = entropy_from_logits(lb, temperature=temperature, chunk_size=4), naive_entropy(lf, temperature)
    assert hb.dtype == torch.float32
    torch.testing.assert_close(hb, hf, atol=1e-5, rtol=1e-5)
    hb.sum().backward()
    hf.sum().backward()
    torch.testing.assert_close(lb.grad.float(), lf.grad, atol=1e-2, rtol=1e-2)
    # uniform logits: entropy is log V
    flat = entropy_from_logits(torch.zeros(1, 2, 50))
    torch.testing.assert_close(flat, torch.full((1, 2), math.log(50)))


class TinyCausalLM(torch.nn.Module):
    """Embedding -> causal running mean -> linear: position t sees tokens <= t only."""

    def __init__(self, vocab=23, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def forward(self, ids):
        h = self.emb[ids].cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return h @ self.out


def completion_logps(model, ids, mask, summed):
    logits = model(ids)[:, :-1]
    lp = token_logprobs(logits, ids[:, 1:], chunk_size=3)
    return summed(lp, mask[:, 1:])


@pytest.mark.parametrize("extra_pad", [1, 5])
def test_right_padding_does_not_change_sequence_logprobs(extra_pad):
    model, pad_id = TinyCausalLM(), 0
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, pad_id, pad_id]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]])  # position 0 is the prompt
    padded_ids = torch.cat([ids, torch.full((2, extra_pad), pad_id)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, extra_pad, dtype=mask.dtype)], 1)

    def check(summed):
        torch.testing.assert_close(
            completion_logps(model, ids, mask, summed), completion_logps(model, padded_ids, padded_mask, summed)
        )

    check(sequence_logprobs)
    check(lambda lp, m: sequence_logprobs(lp, m, average=True))
    with pytest.raises(AssertionError):  # summing without the mask picks up the padding
        check(lambda lp, m: lp.sum(-1))


def test_sequence_logprobs_hand_values_and_inf_padding():
    lp = torch.tensor([[-1.0, -2.0, -float("inf")], [-0.5, -float("inf"), -float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(sequence_logprobs(lp, mask), torch.tensor([-3.0, -0.5]))
    torch.testing.assert_close(sequence_logprobs(lp, mask, average=True), torch.tensor([-1.5, -0.5]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        entropy_from_logits(torch.zeros(1, 2, 3), chunk_size=0)
