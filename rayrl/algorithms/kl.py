"""Per-token estimators of KL(pi || ref) from samples of pi.

J. Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html).
With r = ref(y) / pi(y) and y ~ pi:

- k1 = -log r                 unbiased, high variance, can be negative per sample
- k2 = (log r)^2 / 2          biased (low bias when pi ~ ref), always >= 0
- k3 = (r - 1) - log r        unbiased, low variance, always >= 0 (GRPO's KL term)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["KLKind", "kl_estimate"]

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(
    logp: Tensor, ref_logp: Tensor, *, kind: KLKind, log_ratio_clamp: float | None = 20.0
) -> Tensor:
    """Per-token estimate of KL(pi || ref) for tokens sampled from pi (see module docstring).

    ``logp`` and ``ref_logp`` are log pi(y_t) and log ref(y_t), any shape; returns the same shape.
    For k3 the log ratio ``log r = ref_logp - logp`` is clamped to ``[-c, c]``
    (``c = log_ratio_clamp``, 20 as verl's ``low_var_kl``) before the exp: a token the policy has
    driven to near-zero probability under ref would otherwise overflow to inf and NaN the
    gradient. Departure: verl also clamps the k3 output to [-10, 10]; we do not, so its gradient
    never silently vanishes inside the clamp range. k1 and k2 are not clamped (no exp).
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        if log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
        # expm1 keeps precision when pi ~ ref (the usual case): (r - 1) - log r
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")
