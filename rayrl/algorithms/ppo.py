"""PPO for LLMs: clipped policy and value losses, GAE, KL-in-reward shaping, adaptive KL.

Shapes: (B, T) per-token tensors aligned with the completion tokens; ``mask`` marks the tokens
that were generated (prompt and right padding are 0; masked tokens inside a completion, e.g.
tool output in multi-turn rollouts, are also fine: GAE steps over them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import AggregationMode, aggregate_loss, masked_mean, masked_whiten
from .kl import KLKind, kl_estimate

__all__ = [
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae_advantages",
    "kl_penalized_rewards",
    "AdaptiveKLController",
]

# exp() of a log-ratio beyond this overflows in practice; verl clamps at the same value.
_MAX_LOG_RATIO = 20.0


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, *, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-token ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` (+ dual clip for A < 0).

    Returns (loss, ratio, clipped, dual_clipped) where the last two are bool indicators.
    """
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    dual = None
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        # For A < 0 the clipped objective is unbounded as r grows; cap the loss at -A * c.
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, ratio, is_clipped, dual


def policy_stats(
    logp: Tensor, old_logp: Tensor, ratio: Tensor, clipped: Tensor, dual: Tensor | None, mask: Tensor
) -> dict[str, Tensor]:
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped.float(), mask),
            # which side: ratio under 1 - eps_low (A < 0) or over 1 + eps_high (A > 0; DAPO's clip-higher)
            "clip_frac/low": masked_mean((clipped & (ratio < 1)).float(), mask),
            "clip_frac/high": masked_mean((clipped & (ratio > 1)).float(), mask),
            # KL(pi_old || pi) from samples of pi_old, k3 estimator (low variance, >= 0).
            "approx_kl": masked_mean(kl_estimate(old_logp, logp, kind="k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if dual is not None:
            stats["dual_clip_frac"] = masked_mean(dual.float(), mask)
    return stats


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    tis_weights: Tensor | None = None,
    mode: AggregationMode = "token_mean",
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise.

    ``r_t = pi(y_t) / pi_old(y_t)``,
    ``L_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))``

    - ``eps_low != eps_high`` is DAPO's "clip-higher" (Yu et al. 2025 use 0.2 / 0.28).
    - ``dual_clip = c > 1`` (Ye et al. 2020, "Mastering Complex Control in MOBA Games"; verl's
      ``clip_ratio_c``, typically 3): for A_t < 0, ``L_t = min(L_t, -A_t c)``, so a huge ratio on
      a bad token cannot produce an unbounded update.
    - ``tis_weights`` (B, T): truncated importance weights for sampler/trainer mismatch
      (``truncated_is_weights``), multiplied in detached.
    - The log-ratio is clamped to [-20, 20] before exp (as verl), only to avoid overflow.

    Aggregation over tokens is ``aggregate_loss`` (``mode`` and global counts as documented
    there); TRL's PPO uses token_mean. ``advantages`` is (B, T). Returns ``(loss, stats)`` with
    detached local stats ``clip_frac``, ``approx_kl`` (k3 estimate of KL(pi_old || pi)),
    ``ratio_mean`` and, with dual clip, ``dual_clip_frac``.
    """
    per_token, ratio, clipped, dual = clipped_surrogate(
        logp - old_logp, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )
    if tis_weights is not None:
        per_token = per_token * tis_weights.detach()
    loss = aggregate_loss(
        per_token, mask, mode=mode, global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs, norm_constant=norm_constant,
    )
    return loss, policy_stats(logp, old_logp, ratio, clipped, dual, mask)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.2,
    mode: AggregationMode = "token_mean",
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 baselines / TRL ``cliprange_value``, default 0.2).

    ``L_t = 1/2 max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)``

    ``clip=None`` gives the plain ``1/2 (V_t - R_t)^2``. The clip range is in reward units, so
    it depends on the reward scale (verl defaults to 0.5). Stats: ``vf_clip_frac``,
    ``value_mean``, ``value_error`` (local masked mean of (V - R)^2), detached.
    """
    err = (values - returns) ** 2
    per_token = err
    clipped = torch.zeros_like(err, dtype=torch.bool)
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(err, err_clipped)
        clipped = err_clipped > err
    loss = 0.5 * aggregate_loss(
        per_token, mask, mode=mode, global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs, norm_constant=norm_constant,
    )
    with torch.no_grad():
        stats = {
            "vf_clip_frac": masked_mean(clipped.float(), mask),
            "value_mean": masked_mean(values.detach(), mask),
            "value_error": masked_mean(err.detach(), mask),
        }
    return loss, stats


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), over the masked tokens.

    ``delta_t = r_t + gamma V_{t'} - V_t``, ``A_t = delta_t + gamma lam A_{t'}`` where t' is the
    next *valid* token (V = 0 and A = 0 after the last one). Masked positions are skipped, not
    treated as steps, so right padding (and masked tool tokens) do not change the result.
    ``returns = A + V`` are the value targets. ``whiten`` then whitens the advantages over the
    masked tokens of this batch (TRL's default; gamma 1, lam 0.95 as TRL).

    Inputs (B, T); outputs (advantages, returns), detached, 0 at masked positions.
    """
    m = mask.bool()
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        # where(): a masked step passes the running quantities through untouched.
        last_gae = torch.where(m[:, t], gae, last_gae)
        next_value = torch.where(m[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(m[:, t], gae, torch.zeros_like(gae))
    returns = torch.where(m, advantages + values, torch.zeros_like(advantages))
    if whiten:
        advantages = masked_whiten(advantages, m)
    return advantages, returns


@torch.no_grad()
def kl_penalized_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kl_kind: KLKind = "k1",
) -> Tensor:
    """Per-token rewards with the KL penalty folded in (Ziegler et al. 2019; Ouyang et al. 2022).

    ``r_t = -kl_coef * KL_t + [t = last valid token] * score``, KL_t from ``kl_estimate``
    (k1 = log pi - log ref by default, as TRL's ``kl_estimator``). ``scores`` (B,) is the
    sequence-level reward; a row with no valid token gets no score. Returns (B, T), detached,
    0 at masked positions.
    """
    m = mask.bool()
    kl = kl_estimate(logp, ref_logp, kind=kl_kind)
    rewards = torch.where(m, -kl_coef * kl, torch.zeros_like(kl))
    T = m.shape[-1]
    last = (T - 1 - m.flip(-1).int().argmax(-1)).unsqueeze(-1)  # index of last valid token
    score = torch.where(m.any(-1), scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(-1, last, score.unsqueeze(-1))


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019), as in TRL's legacy PPO.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.
    Defaults are TRL's (init 0.2, target 6 nats, horizon 10000).
    """

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value
