"""Critic-free policy gradient: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, and the
truncated importance-sampling fix for sampler/trainer mismatch.

Rewards are one scalar per completion, laid out as consecutive groups of ``group_size``
completions of the same prompt: ``rewards.view(-1, group_size)``. Group statistics need whole
groups, so compute advantages before splitting a batch over ranks or micro-batches.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .aggregation import AggregationMode, aggregate_loss, masked_mean, masked_whiten
from .kl import KLKind, kl_estimate
from .ppo import clipped_surrogate, policy_stats, gae_advantages

__all__ = [
    "group_advantages",
    "policy_gradient_loss",
    "truncated_is_weights",
    "overlong_mask",
    "overlong_penalty",
    "rloo_advantages",
    "reinforce_pp_advantages",
]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N divisible by {group_size=}, got {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-6,
    valid: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, "outcome supervision").

    ``A_i = (r_i - mean(group)) / (std + eps)``, with ``std``:

    - ``group``: std of the group (GRPO; unbiased std as ``torch.std``, like TRL and verl),
    - ``batch``: std of all rewards in the batch (TRL ``scale_rewards="batch"``; "Lite PPO",
      Liu et al. 2025, "Tricks or Traps?"),
    - ``none``: no scaling (Dr. GRPO, Liu et al. 2025: std scaling up-weights too-easy/too-hard
      prompts).

    A group of equal rewards gets advantage exactly 0 (in float32, ``0.7 - mean([0.7] * 7)`` is not 0,
    and dividing that by ``0 + eps`` would push the whole group one way). ``eps`` 1e-6 as verl (TRL
    uses 1e-4). Returns (N,) in the rewards' dtype; broadcast to tokens by ``policy_gradient_loss``.

    ``valid`` (N,) bool: completions without a reward (``rewards[i].on_failure: exclude``) are False:
    they take no part in their group's mean and std (nor the batch std) and get advantage 0; a group
    with fewer than two valid completions has no baseline, so all its advantages are 0.
    """
    if valid is not None and not bool(valid.all()):
        return _valid_group_advantages(rewards, group_size, scale, eps, valid)
    g = _groups(rewards, group_size).double()
    centered = g - g.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (g.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.double().std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return _zero_equal_groups(g, centered).reshape(-1).to(rewards.dtype)


def _zero_equal_groups(groups: Tensor, advantages: Tensor) -> Tensor:
    equal = (groups == groups[:, :1]).all(-1, keepdim=True)
    return torch.where(equal, torch.zeros_like(advantages), advantages)


def _valid_groups(rewards: Tensor, group_size: int, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(groups in float64, their valid mask, valid count per group (G, 1))."""
    g = _groups(rewards, group_size).double()
    v = valid.reshape(g.shape).bool()
    return g, v, v.sum(-1, keepdim=True)


def _zero_equal_valid(g: Tensor, v: Tensor, count: Tensor, advantages: Tensor) -> Tensor:
    """0 outside ``v``, and for groups whose valid rewards are all equal or that have < 2 of them."""
    spread = g.masked_fill(~v, -math.inf).amax(-1, keepdim=True) > g.masked_fill(~v, math.inf).amin(-1, keepdim=True)
    return torch.where(v & spread & (count >= 2), advantages, torch.zeros_like(advantages))


def _valid_group_advantages(rewards: Tensor, group_size: int, scale: str, eps: float, valid: Tensor) -> Tensor:
    g, v, count = _valid_groups(rewards, group_size, valid)
    mean = (g * v).sum(-1, keepdim=True) / count.clamp_min(1)
    centered = (g - mean) * v
    if scale == "group":  # unbiased std over the valid members, as torch.std over them
        centered = centered / (((centered ** 2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt() + eps)
    elif scale == "batch":
        centered = centered / (rewards.double()[valid.bool()].std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return _zero_equal_valid(g, v, count, centered).reshape(-1).to(rewards.dtype)


def rloo_advantages(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019).

    ``A_i = r_i - 1/(k-1) sum_{j != i} r_j = (k r_i - sum_j r_j) / (k - 1)`` within each group of
    k samples: each sample's baseline is the mean of the *other* samples, so it is unbiased.
    With ``valid`` (N,) bool, k and the sum run over a group's valid completions; the others get 0.
    Returns (N,).
    """
    if valid is not None and not bool(valid.all()):
        g, v, count = _valid_groups(rewards, group_size, valid)
        loo = (count * g - (g * v).sum(-1, keepdim=True)) / (count - 1).clamp_min(1)
        return _zero_equal_valid(g, v, count, loo).reshape(-1).to(rewards.dtype)
    g = _groups(rewards, group_size).double()
    k = group_size
    return _zero_equal_groups(g, (k * g - g.sum(-1, keepdim=True)) / (k - 1)).reshape(-1).to(rewards.dtype)


def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): discounted returns, whitened across the whole batch.

    ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over valid tokens, ``A_t = (G_t - mean) / std`` with
    mean/std over all valid tokens of the batch (no critic, no per-prompt baseline).
    ``token_rewards`` usually come from ``kl_penalized_rewards`` (score at the last token minus
    the per-token KL penalty). For "REINFORCE++-baseline", subtract the group mean from the
    scores first (``group_advantages(..., scale="none")``). Whitening here is over this tensor:
    for the paper's global normalisation pass the whole step's batch, or all-reduce the stats.

    Returns (advantages, returns), (B, T), detached, 0 at masked positions.
    """
    returns, _ = gae_advantages(
        token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0, whiten=False
    )
    advantages = masked_whiten(returns, mask) if whiten else returns
    return advantages, returns


@torch.no_grad()
def truncated_is_weights(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """Truncated importance weights for the sampler/trainer log-prob mismatch.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training":
    the inference engine (vLLM) and the trainer compute different probabilities for the same
    weights, so rollouts are slightly off-policy. Weight each token's loss by
    ``w_t = min(pi_trainer(y_t) / pi_sampler(y_t), C)``, with ``trainer_logp`` the trainer's
    log-probs of the rollout under the *old* (rollout) weights. ``cap`` C = 2 as in their
    recipe / verl. Computed as ``exp(min(log ratio, log C))`` so it cannot overflow.
    Returns (B, T), detached, 0 at masked positions.
    """
    w = torch.exp((trainer_logp - sampler_logp).clamp(max=math.log(cap)))
    return torch.where(mask.bool(), w, torch.zeros_like(w))


def overlong_mask(is_truncated: Tensor, mask: Tensor) -> Tensor:
    """DAPO overlong filtering (Yu et al. 2025): drop completions cut off at the length limit.

    A truncated completion has no proper ending, so its reward is noise; its whole row is masked
    out. Returns ``mask`` with those rows zeroed (same dtype). With the seq aggregation modes the
    dropped rows no longer count as sequences either (see ``aggregate_loss``).
    """
    return torch.where(is_truncated.bool().unsqueeze(-1), torch.zeros_like(mask), mask)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a reward added to the score.

    0 up to ``max_len - buffer`` tokens, then falling linearly to -1 at ``max_len``:
    ``((max_len - buffer) - |y|) / buffer``; -1 beyond ``max_len``. Returns (N,) float32.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in (0, max_len={max_len}], got {buffer}")
    over = lengths.float() - (max_len - buffer)
    return torch.where(lengths > max_len, torch.full_like(over, -1.0), -(over.clamp(min=0) / buffer))


def policy_gradient_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ratio_level: Literal["token", "sequence"] = "token",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    tis_weights: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    mode: AggregationMode = "token_mean",
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss of the GRPO family.

    ``L_t = max(-A s_t, -A clip(s_t, 1 - eps_low, 1 + eps_high)) [* w_t] + kl_coef * KL_t``,
    aggregated with ``aggregate_loss`` (``mode``, global counts, ``norm_constant``).

    - ``ratio_level="token"``: ``s_t = pi(y_t) / pi_old(y_t)`` (GRPO, Shao et al. 2024).
    - ``ratio_level="sequence"``: GSPO (Zheng et al. 2025), the length-normalised sequence ratio
      ``s_i = exp(1/|y_i| sum_t log(pi(y_t) / pi_old(y_t)))``, written per token with the
      paper's stop-gradient trick (GSPO-token) ``s_t = sg[s_i] * pi(y_t) / sg[pi(y_t)]``: the
      value (and so the clipping) is s_i, and with sequence advantages the gradient equals
      GSPO's. With token-varying advantages or ``tis_weights`` the gradient is GSPO-token's,
      which by design is not the derivative of the loss value. The paper uses
      ``mode="seq_mean_token_mean"`` and a tiny clip range (eps_low 3e-4, eps_high 4e-4);
      pass those, the defaults here are GRPO's.
    - ``eps_high > eps_low``: DAPO clip-higher (0.28 vs 0.2). Dr. GRPO:
      ``mode="seq_mean_token_sum_norm"`` with ``group_advantages(scale="none")``.
    - ``tis_weights``: ``truncated_is_weights`` (detached multiplier). ``dual_clip`` as in
      ``clipped_policy_loss``.
    - ``kl_coef > 0`` needs ``ref_logp`` and adds the per-token KL(pi || ref) estimate (k3, as
      GRPO) inside the per-token loss. Default 0 (no reference model), as TRL/DAPO.

    ``advantages`` is (B,) (broadcast over tokens) or (B, T). Returns ``(loss, stats)``: detached
    local ``clip_frac``, ``approx_kl`` (KL(pi_old || pi), k3), ``ratio_mean`` (of s), and
    ``kl`` when the KL term is on.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logp)

    token_log_ratio = logp - old_logp
    if ratio_level == "token":
        log_ratio = token_log_ratio
    elif ratio_level == "sequence":
        seq_log_ratio = masked_mean(token_log_ratio, mask, dim=-1).unsqueeze(-1)
        log_ratio = seq_log_ratio.detach() + logp - logp.detach()
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}")

    per_token, ratio, clipped, dual = clipped_surrogate(
        log_ratio, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )
    if tis_weights is not None:
        per_token = per_token * tis_weights.detach()
    kl = None
    if kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_estimate(logp, ref_logp, kind=kl_kind)
        per_token = per_token + kl_coef * kl

    loss = aggregate_loss(
        per_token, mask, mode=mode, global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs, norm_constant=norm_constant,
    )
    stats = policy_stats(logp, old_logp, ratio, clipped, dual, mask)
    if kl is not None:
        stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats
