"""Masked reductions and the single place where per-token losses become a scalar.

Every stage (SFT, PPO, GRPO, ...) reduces (B, T) per-token values with ``aggregate_loss`` so
that the normalisation, and its interaction with gradient accumulation and data parallelism,
is defined and tested once.

Gradient accumulation and data parallelism. A step's batch is split over R ranks and M
micro-batches per rank. A per-micro-batch mean weights a token by 1 / (tokens in *its*
micro-batch), so the gradient depends on how the batch was split. Pass the step-wide count
(``global_num_tokens`` / ``global_num_seqs``, e.g. from ``num_tokens_and_seqs`` summed over the
micro-batches and all-reduced over ranks) and each call returns its micro-batch's *share*:
summing the returned losses (hence the gradients) over all micro-batches and ranks equals the
mean over the whole batch. Consequences for the caller: do not divide by the number of
accumulation steps, and because DDP/FSDP *average* gradients over ranks, multiply the loss by
the world size (or reduce gradients with a sum) to recover the exact global mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AggregationMode",
    "aggregate_loss",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "num_tokens_and_seqs",
]

AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values * mask)`` over ``dim`` (all dims if None); masked entries are selected out,
    so NaN/inf in padding cannot leak into the result."""
    v = torch.where(mask.bool(), values, torch.zeros_like(values))
    return v.sum() if dim is None else v.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values * mask) / sum(mask)`` over ``dim``. An all-masked slice gives 0 (not NaN):
    an empty micro-batch must contribute nothing rather than poison the step."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL; none for n < 2)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(values.dtype)
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(values - mean) / sqrt(var + eps)`` with masked statistics (TRL's ``masked_whiten``).

    ``shift_mean=False`` adds the mean back, i.e. only rescales (TRL's choice for rewards).
    Statistics are over this tensor only; whitening across ranks needs all-reduced sums.
    Masked positions are returned as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def num_tokens_and_seqs(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Counts as ``aggregate_loss`` uses them: valid tokens, and sequences with >= 1 valid token.

    Sum these over micro-batches (and all-reduce over ranks) to get ``global_num_tokens`` and
    ``global_num_seqs``.
    """
    m = mask.bool()
    return m.sum(), m.any(-1).sum()


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    *,
    mode: AggregationMode = "token_mean",
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """Reduce per-token ``values`` (B, T) to a scalar loss.

    Modes (L_it = values, m_it = mask, S = sequences with at least one valid token):

    - ``token_mean``: ``sum_it m L / sum_it m``. Every token weighs the same ("token-level
      policy gradient loss" of DAPO, Yu et al. 2025).
    - ``seq_mean_token_mean``: ``1/|S| sum_i (sum_t m L / sum_t m)``. Every sequence weighs the
      same (GRPO
      objective of DeepSeekMath, Shao et al. 2024; GSPO, Zheng et al. 2025).
    - ``seq_mean_token_sum_norm``: ``1/|S| sum_i (sum_t m L) / C``. Dr. GRPO (Liu et al. 2025):
      removes the 1/|o_i| length bias; ``C = norm_constant`` is required and should be the
      generation budget (max new tokens). It is not defaulted to the padded length T because a
      micro-batch's T depends on how the batch was split.

    With ``global_num_tokens`` (token_mean) or ``global_num_seqs`` (seq modes), the denominator
    is the step-wide count instead of the local one, and the result is this micro-batch's share
    of the global mean (see the module docstring). The count that the mode does not use is
    ignored, so callers may always pass both.
    """
    m = mask.bool()
    if mode == "token_mean":
        denom = m.sum().clamp_min(1) if global_num_tokens is None else global_num_tokens
        return masked_sum(values, m) / _as(denom, values)

    if mode == "seq_mean_token_mean":
        per_seq = masked_sum(values, m, dim=-1) / m.sum(-1).clamp_min(1).to(values.dtype)
    elif mode == "seq_mean_token_sum_norm":
        if norm_constant is None:
            raise ValueError("mode='seq_mean_token_sum_norm' needs norm_constant (the generation budget)")
        per_seq = masked_sum(values, m, dim=-1) / norm_constant
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}")
    # Fully masked rows (e.g. filtered overlong samples) contribute 0 and do not count.
    denom = m.any(-1).sum().clamp_min(1) if global_num_seqs is None else global_num_seqs
    return per_seq.sum() / _as(denom, values)


def _as(x: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)
