"""Offline preference losses: DPO family (sigmoid / cDPO, IPO, hinge, robust), SimPO, ORPO, KTO.

All take *sequence-level* log-probs (B,) computed by the caller with ``sequence_logprobs``
(summed, or ``average=True`` where the method says so) and return per-example losses (B,) so the
caller picks the reduction (``losses.mean()``, or ``losses.sum() / global_num_pairs`` under
gradient accumulation). Stats are detached batch means.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPOLossType",
    "dpo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_reference_point",
    "nll_from_logps",
]

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


def nll_from_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence token-mean NLL ``-sum_t m log p / sum_t m`` (B,): the SFT term that
    ``dpo_loss(sft_weight=...)``, ``simpo_loss`` and ``orpo_loss`` add on the chosen response."""
    m = mask.bool()
    return -torch.where(m, token_logps, torch.zeros_like(token_logps)).sum(-1) / m.sum(-1).clamp_min(1)


def _reward_stats(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def _add_sft(losses: Tensor, sft_weight: float, chosen_nll: Tensor | None) -> Tensor:
    if not sft_weight:
        return losses
    if chosen_nll is None:
        raise ValueError("sft_weight > 0 needs chosen_nll (per-sequence NLL of the chosen response)")
    return losses + sft_weight * chosen_nll


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    # cDPO (Mitchell 2023): the label is flipped with probability eps.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_nll: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO and its close variants on one logit ``h = (log pi_c - log ref_c) - (log pi_r - log ref_r)``.

    - ``sigmoid``: DPO (Rafailov et al. 2023, Eq. 7) ``-log sigmoid(beta h)``; with
      ``label_smoothing = eps > 0`` it is conservative DPO (cDPO, Mitchell 2023):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``ipo``: IPO (Azar et al. 2023, Eq. 17) ``(h - 1 / (2 beta))^2``, beta = tau. As in TRL,
      pass *per-token averaged* log-probs (``sequence_logprobs(..., average=True)``) for IPO.
    - ``hinge``: SLiC (Zhao et al. 2023) ``max(0, 1 - beta h)``.
    - ``robust``: rDPO (Chowdhury et al. 2024), the unbiased loss under label-flip rate
      eps, as TRL: ``[-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)``.

    Defaults are TRL's (beta 0.1, sigmoid, no smoothing). ``sft_weight`` adds
    ``sft_weight * chosen_nll`` per example (RPO, Pang et al. 2024; TRL's ``rpo_alpha``);
    ``chosen_nll`` is per-sequence (B,), e.g. from ``nll_from_logps``.

    Returns ``(losses (B,), stats)`` with exactly the TRL keys ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, where the implicit reward
    is ``beta * (log pi - log ref)``.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        if label_smoothing >= 0.5:
            raise ValueError("robust DPO needs label_smoothing < 0.5 (it divides by 1 - 2 eps)")
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")

    losses = _add_sft(losses, sft_weight, chosen_nll)
    return losses, _reward_stats(beta * chosen_logratios, beta * rejected_logratios)


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    gamma: float | None = None,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_nll: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng et al. 2024), reference-free with a target margin gamma.

    ``L = -log sigmoid(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma)``

    Inputs are length-normalised (per-token averaged) log-probs,
    ``sequence_logprobs(..., average=True)``. Defaults follow the paper's recipe (beta 2.0,
    gamma/beta 0.5, i.e. gamma = 1.0); ``gamma`` sets the margin directly and overrides
    ``gamma_beta_ratio`` (it is TRL ``CPOTrainer``'s ``simpo_gamma``, with loss
    ``-logsigmoid(beta * (avg_c - avg_r) - gamma)``). ``label_smoothing`` smooths as cDPO;
    ``sft_weight * chosen_nll`` is CPO's optional NLL term. Rewards in stats are ``beta * avg_logp``.
    """
    margin = beta * gamma_beta_ratio if gamma is None else gamma
    logits = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - margin
    losses = _add_sft(_smoothed_logsigmoid_loss(logits, label_smoothing), sft_weight, chosen_nll)
    return losses, _reward_stats(beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al. 2024): SFT plus an odds-ratio penalty, no reference model.

    ``L = NLL_c - lambda * log sigmoid(log odds(y_c) - log odds(y_r))``,
    ``log odds(y) = a - log(1 - exp(a))``, ``a`` = per-token averaged log-prob of y.

    ``beta`` is the paper's lambda (TRL ``ORPOConfig.beta``, default 0.1). ``chosen_nll`` (B,)
    is the chosen response's token-mean NLL (``nll_from_logps``). Departures from TRL: TRL adds
    the batch-mean NLL, here it is per example so ``losses.mean()`` gives the same value; and
    ``a`` is clamped to <= -1e-6 so a response with probability ~1 cannot make the odds infinite
    (``log(1 - exp(a))`` is computed stably). Stats: the four ``rewards/*`` keys with reward
    ``beta * a`` (as TRL), plus ``log_odds_ratio`` and ``nll``.
    """
    a_c = policy_chosen_avg_logps.clamp(max=-1e-6)
    a_r = policy_rejected_avg_logps.clamp(max=-1e-6)
    log_odds = (a_c - _log1mexp(a_c)) - (a_r - _log1mexp(a_r))
    ratio_term = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * ratio_term
    stats = _reward_stats(beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps)
    stats["log_odds_ratio"] = ratio_term.detach().mean()
    stats["nll"] = chosen_nll.detach().mean()
    return losses, stats


def kto_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """KTO reference point ``z0 = max(0, mean_j [log pi(y_j'|x_j) - log ref(y_j'|x_j)])``, detached.

    Ethayarajh et al. 2024: estimated on *mismatched* pairs (x_j, y_j') -- each prompt
    with another example's completion -- as a biased but low-variance estimate of
    KL(pi || ref). Under data parallelism, all-reduce the mean before the clamp (as TRL does).
    Detached: the paper does not back-propagate through z0.
    """
    return (kl_policy_logps - kl_ref_logps).detach().mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    reference_point: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO (Ethayarajh et al. 2024) for unpaired, binary-labelled completions.

    With implied reward ``r = log pi(y|x) - log ref(y|x)`` and reference point ``z0``:

    - desirable:   ``w_d * (1 - sigmoid(beta (r - z0)))``
    - undesirable: ``w_u * (1 - sigmoid(beta (z0 - r)))``

    Defaults as TRL (beta 0.1, both weights 1); the paper suggests choosing weights so that
    ``w_d n_d / (w_u n_u)`` is in [1, 4/3]. ``reference_point`` is z0 from
    ``kto_reference_point`` (0 for the "KTO without z0" ablation); it is detached here as well.
    Losses keep the input order (TRL concatenates chosen then rejected).

    Args: ``policy_logps``, ``ref_logps`` summed sequence log-probs (B,); ``desirable`` (B,) bool.
    Returns ``(losses (B,), stats)``; stats: ``rewards/chosen`` / ``rewards/rejected`` (mean
    ``beta * r`` over desirable / undesirable examples, 0 if none), ``kl`` (z0),
    ``num_desirable``, ``num_undesirable``.
    """
    d = desirable.bool()
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(d, chosen_losses, rejected_losses)

    rewards = beta * r.detach()
    n_d, n_u = d.sum(), (~d).sum()
    zero = torch.zeros_like(rewards)
    stats = {
        "rewards/chosen": torch.where(d, rewards, zero).sum() / n_d.clamp_min(1),
        "rewards/rejected": torch.where(d, zero, rewards).sum() / n_u.clamp_min(1),
        "kl": z0,
        "num_desirable": n_d,
        "num_undesirable": n_u,
    }
    return losses, stats
