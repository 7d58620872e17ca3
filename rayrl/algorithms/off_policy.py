"""Off-policy correction for samples drawn by an older or different policy than the one trained.

Three policies meet in one policy-gradient step:

- the behaviour policy ``mu``: the engine that sampled the tokens (its log-probs come with every
  completion). In asynchronous RL it may be up to ``rollout.max_staleness`` versions old; even in
  sync RL the engine's numerics differ slightly from the trainer's.
- the proximal policy ``pi_prox``: the trainer's weights before this step's update (the "old"
  log-probs the loop computes); the clipped ratio ``r_t = pi_theta(y_t) / pi_prox(y_t)`` is taken
  against it.
- the policy being optimised, ``pi_theta``.

With ``rho_t = pi_prox(y_t) / mu(y_t)`` (the behaviour importance ratio, per token) each correction is
a detached per-token weight ``w_t`` that multiplies the clipped surrogate:
``L_t = w_t * max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))``.

- ``none``: ``w_t = 1``. The behaviour/proximal mismatch is ignored (the clip range is the only
  guard); exact when ``mu == pi_prox``, as in sync RL up to engine numerics.
- ``tis``: truncated importance sampling, ``w_t = min(rho_t, C)`` (Yao et al. 2025, "Your Efficient
  RL Framework Secretly Brings You Off-Policy RL Training"; Espeholt et al. 2018's truncated rho).
  Biased towards the behaviour policy where rho is cut, low variance.
- ``mis``: masked importance sampling, ``w_t = 1[1/C <= rho_t <= C]`` (IcePop, Ling Team 2025): tokens
  whose two probabilities disagree by more than a factor C get no gradient; the others are not
  reweighted. The masked tokens still count in the loss's normaliser.
- ``decoupled``: decoupled PPO (Fu et al. 2025, AReaL, eq. 5), ``J = E_mu[rho_t min(r_t A, clip(r_t) A)]``:
  the full behaviour ratio ``w_t = rho_t``, while the trust region is around ``pi_prox``. Tokens with
  ``rho_t > C`` are dropped (``w_t = 0``), as AReaL's ``behav_imp_weight_cap`` does, since an
  unbounded weight lets one token dominate a step.

All are computed in log space (``exp`` of a clamped log-ratio), so no weight overflows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["OffPolicyCorrection", "OFF_POLICY_CORRECTIONS", "off_policy_weights"]

OffPolicyCorrection = Literal["none", "tis", "mis", "decoupled"]
OFF_POLICY_CORRECTIONS: tuple[str, ...] = ("none", "tis", "mis", "decoupled")


def off_policy_weights(kind: OffPolicyCorrection, proximal_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, *,
                       cap: float = 2.0) -> Tensor | None:
    """Per-token weights ``w_t`` (B, T) for correction ``kind`` (see the module docstring), detached, 0 at
    masked positions; None for ``none``. ``proximal_logp``: the trainer's log-probs of the sampled tokens
    before the update; ``behaviour_logp``: the sampler's; ``cap``: C > 1."""
    if kind == "none":
        return None
    if cap <= 1:
        raise ValueError(f"the off-policy cap must be > 1, got {cap}")
    log_rho = (proximal_logp - behaviour_logp).detach()
    log_cap = math.log(cap)
    if kind == "tis":
        weights = torch.exp(log_rho.clamp(max=log_cap))
    elif kind == "mis":
        weights = ((log_rho >= -log_cap) & (log_rho <= log_cap)).to(proximal_logp.dtype)
    elif kind == "decoupled":
        kept = log_rho <= log_cap
        weights = torch.where(kept, torch.exp(log_rho.clamp(max=log_cap)), torch.zeros_like(log_rho))
    else:
        raise ValueError(f"unknown off-policy correction {kind!r}; choose one of {OFF_POLICY_CORRECTIONS}")
    return torch.where(mask.bool(), weights, torch.zeros_like(weights))
