"""Per-token log-probabilities and entropy from logits, without materialising a log-softmax.

At vocab 150k and 4k tokens one float32 copy of the logits is 2.5 GB. The naive
``log_softmax(logits).gather(tokens)`` keeps a full log-softmax for backward, and its backward
pass scatters the gather's gradient into another full-size tensor before producing the logits
gradient. Here the forward pass walks the sequence in chunks
and keeps only one (B, T) logsumexp per token; the backward pass recomputes the softmax chunk
by chunk and writes straight into the logits gradient. Peak extra memory is one reused
(chunk_size, V) float32 work buffer (two for bf16 logits and for entropy), plus the gradient
itself, which any method must return.

Chunks are plain views ``logits[b, s:e]`` so the usual ``logits[:, :-1]`` shift is not copied.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs", "entropy_from_logits", "sequence_logprobs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast to float32; float64 stays float64 (for gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _chunks(logits: Tensor, chunk_size: int):
    B, T = logits.shape[:2]
    for b in range(B):
        for s in range(0, T, chunk_size):
            yield b, slice(s, min(s + chunk_size, T))


def _check(logits: Tensor, temperature: float, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


class _Workspace:
    """(chunk, V) float32 buffers allocated once and reused by every chunk.

    A fresh buffer per chunk would hold two alive at the hand-over and, on CPU, pay the page
    faults of a new mmap each time.
    """

    def __init__(self, logits: Tensor, chunk_size: int, n: int) -> None:
        rows = min(chunk_size, logits.shape[1])
        self.cdt = _compute_dtype(logits.dtype)
        self.bufs = [logits.new_empty((rows, logits.shape[-1]), dtype=self.cdt) for _ in range(n)]
        # Low-precision logits need one more buffer for the upcast copy.
        self.xbuf = None if logits.dtype == self.cdt else logits.new_empty((rows, logits.shape[-1]), dtype=self.cdt)

    def load(self, chunk: Tensor) -> Tensor:
        return chunk if self.xbuf is None else self.xbuf[: len(chunk)].copy_(chunk)

    def buf(self, i: int, rows: int) -> Tensor:
        return self.bufs[i][:rows]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, inv_t: float, chunk_size: int) -> Tensor:
        ws = _Workspace(logits, chunk_size, n=1)
        B, T, _ = logits.shape
        out = torch.empty(B, T, dtype=ws.cdt, device=logits.device)
        lse = torch.empty(B, T, dtype=ws.cdt, device=logits.device)
        for b, sl in _chunks(logits, chunk_size):
            x = ws.load(logits[b, sl])
            m = x.amax(-1, keepdim=True)
            # exp((x - max) / t) in the one work buffer; max of x/t is max(x)/t since t > 0.
            z = torch.sub(x, m, out=ws.buf(0, len(x))).mul_(inv_t).exp_()
            lse[b, sl] = z.sum(-1).log_() + m.squeeze(-1) * inv_t
            tgt = x.gather(-1, tokens[b, sl].unsqueeze(-1)).squeeze(-1) * inv_t
            out[b, sl] = tgt - lse[b, sl]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.inv_t, ctx.chunk_size = inv_t, chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, tokens, lse = ctx.saved_tensors
        inv_t, cdt = ctx.inv_t, lse.dtype
        # Same-dtype gradients are computed in place in the gradient itself: no work buffer.
        ws = _Workspace(logits, ctx.chunk_size, n=0 if logits.dtype == cdt else 1)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # d/dx_j [x_tok/t - lse(x/t)] = (onehot_j - softmax_j(x/t)) / t
        g = grad_out.to(cdt) * inv_t
        for b, sl in _chunks(logits, ctx.chunk_size):
            x, dst = ws.load(logits[b, sl]), grad[b, sl]
            p = torch.mul(x, inv_t, out=dst if ws.xbuf is None else ws.buf(0, len(x)))
            p.sub_(lse[b, sl].unsqueeze(-1)).exp_().mul_(-g[b, sl].unsqueeze(-1))
            p.scatter_add_(-1, tokens[b, sl].unsqueeze(-1), g[b, sl].unsqueeze(-1))
            if p is not dst:
                dst.copy_(p)
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)``.

    ``out[b, t] = logits[b, t, tokens[b, t]] / tau - logsumexp_v(logits[b, t, v] / tau)``

    Same as ``log_softmax(logits.float() / tau, -1).gather(-1, tokens[..., None])`` (TRL's
    ``selective_log_softmax``) but chunked over the sequence, ``chunk_size`` positions at a time,
    with a memory-lean custom backward (see module docstring). Computed in float32 for bf16/fp16
    /fp32 logits (float64 stays float64). Differentiable w.r.t. ``logits``.

    Pass the *sampling* temperature when scoring sampled tokens (as vLLM samples from
    ``softmax(logits / tau)``); otherwise importance ratios against the sampler are biased.
    ``tokens`` must be valid ids in ``[0, V)`` everywhere: give padded positions any real id
    (e.g. the pad id) and drop them with a mask downstream; ``-100`` raises.

    Args:
        logits: (B, T, V), any float dtype; a shifted view such as ``logits[:, :-1]`` is fine.
        tokens: (B, T) int64, the token whose log-prob is wanted at each position.
    Returns:
        (B, T) float32 (float64 for float64 logits).
    """
    _check(logits, temperature, chunk_size)
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    return _TokenLogprobs.apply(logits, tokens.long(), 1.0 / temperature, chunk_size)


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, inv_t: float, chunk_size: int) -> Tensor:
        ws = _Workspace(logits, chunk_size, n=2)
        B, T, _ = logits.shape
        ent = torch.empty(B, T, dtype=ws.cdt, device=logits.device)
        lse = torch.empty(B, T, dtype=ws.cdt, device=logits.device)
        for b, sl in _chunks(logits, chunk_size):
            x = ws.load(logits[b, sl])
            m = x.amax(-1, keepdim=True)
            zc = torch.sub(x, m, out=ws.buf(0, len(x))).mul_(inv_t)  # z - max(z), z = x / t
            e = torch.exp(zc, out=ws.buf(1, len(x)))
            s = e.sum(-1)
            # H = log S - sum_v e_v (z_v - max) / S, with e = exp(z - max), S = sum e
            ent[b, sl] = s.log() - torch.linalg.vecdot(e, zc) / s
            lse[b, sl] = s.log() + m.squeeze(-1) * inv_t
        ctx.save_for_backward(logits, lse, ent)
        ctx.inv_t, ctx.chunk_size = inv_t, chunk_size
        return ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, ent = ctx.saved_tensors
        inv_t, cdt = ctx.inv_t, lse.dtype
        same = logits.dtype == cdt  # then log p is built in the gradient's own storage
        ws = _Workspace(logits, ctx.chunk_size, n=1 if same else 2)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # dH/dz_j = -p_j (log p_j + H);  dz/dx = 1/t
        g = grad_out.to(cdt) * inv_t
        for b, sl in _chunks(logits, ctx.chunk_size):
            x, dst = ws.load(logits[b, sl]), grad[b, sl]
            logp = torch.mul(x, inv_t, out=dst if same else ws.buf(1, len(x)))
            logp.sub_(lse[b, sl].unsqueeze(-1))
            p = torch.exp(logp, out=ws.buf(0, len(x)))
            logp.add_(ent[b, sl].unsqueeze(-1)).mul_(p).mul_(-g[b, sl].unsqueeze(-1))
            if logp is not dst:
                dst.copy_(logp)
        return grad, None, None


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, chunked like ``token_logprobs``.

    ``H[b, t] = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v``, ``z = logits[b, t] / tau``.
    Float32 compute for low-precision logits; differentiable (for an entropy bonus).
    Returns (B, T).
    """
    _check(logits, temperature, chunk_size)
    return _Entropy.apply(logits, 1.0 / temperature, chunk_size)


def sequence_logprobs(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """Sum (or, with ``average=True``, mean) of ``token_logps`` over the masked tokens of each row.

    ``log pi(y|x) = sum_t mask_t * log pi(y_t | x, y_<t)``. Padding, whatever its value
    (even -inf), does not leak in: masked entries are selected out, not multiplied by 0.
    ``average=True`` gives the length-normalised log-prob used by IPO (TRL), SimPO and ORPO;
    an all-masked row gives 0. Returns (B,).
    """
    m = mask.bool()
    total = torch.where(m, token_logps, torch.zeros_like(token_logps)).sum(-1)
    if average:
        total = total / m.sum(-1).clamp_min(1)
    return total
