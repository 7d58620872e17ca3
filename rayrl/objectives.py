"""The objectives a trainer rank optimises: the loss settings the driver hands to each rank, and the
dispatch from them to the pure functions of rayrl.algorithms.

- ``PolicyGradientObjective`` + ``policy_gradient_objective_loss``: the clipped policy-gradient loss
  of the GRPO family and PPO (ratio level, clip range, KL term, off-policy correction, overlong filter, aggregation).
- ``PreferenceObjective`` + ``preference_loss``: the DPO family, SimPO, ORPO and KTO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayrl.algorithms import (dpo_loss, kto_loss, kto_reference_point, orpo_loss, overlong_mask,
                              off_policy_weights, policy_gradient_loss, simpo_loss)
from rayrl.data.rollout import RolloutBatch

REFERENCE_FREE = ("simpo", "orpo")
# The metric: token-mean |engine - trainer| log-prob of the sampled tokens (the trainer before the update).
SAMPLER_TRAINER_GAP = "logprob_gap/sampler_trainer"


@dataclass(frozen=True)
class PolicyGradientObjective:
    """The GRPO-family / PPO loss settings handed to each rank (see rayrl.algorithms.policy_gradient_loss)."""

    ratio_level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    aggregation: str = "token_mean"
    norm_constant: float | None = None
    off_policy: str = "none"  # rayrl.algorithms.off_policy: none, tis, mis, decoupled
    off_policy_cap: float = 2.0
    overlong_filter: bool = False
    # The sampling temperature: the rollout engine samples from softmax(logits / T) and reports
    # those log-probs, so ratios, KL and entropy must be taken at the same T.
    temperature: float = 1.0


def policy_gradient_objective_loss(objective: PolicyGradientObjective, logps: torch.Tensor, entropy: torch.Tensor,
                                   batch: RolloutBatch, *, global_num_tokens: int,
                                   global_num_seqs: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of an optimizer step's policy-gradient loss and its token-mean stats.

    ``logps`` (B, T-1) and the detached ``entropy`` (B, T-1) are the current policy's next-token
    log-probs and entropies at ``objective.temperature``;
    the loss is normalised by the optimizer step's global token (or sequence) count over all ranks and
    micro-batches, and each stat is weighted by this micro-batch's share of the step's loss tokens, so
    summing over micro-batches and ranks gives the step's token means."""
    device = logps.device
    mask = batch.tokens.loss_mask[:, 1:].to(device)
    on_policy = batch.old_logps is None  # one optimizer step per batch: the ratio is 1, its gradient the PG's
    old = logps.detach() if on_policy else batch.old_logps.to(device)
    if objective.overlong_filter:
        mask = overlong_mask(batch.overlong.to(device), mask)
    # The behaviour (sampler) / proximal (old) mismatch: engine numerics, or staleness in async RL.
    weights = off_policy_weights(objective.off_policy, old, batch.sampler_logps.to(device), mask,
                                 cap=objective.off_policy_cap)
    loss, stats = policy_gradient_loss(
        logps, old, batch.advantages.to(device), mask, ratio_level=objective.ratio_level,
        eps_low=objective.eps_low, eps_high=objective.eps_high, tis_weights=weights,
        ref_logp=None if batch.ref_logps is None else batch.ref_logps.to(device),
        kl_coef=objective.kl_coef, kl_kind=objective.kl_kind, mode=objective.aggregation,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
        norm_constant=objective.norm_constant)
    with torch.no_grad():
        stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp_min(1)
        if on_policy:  # no separate log-prob pass gave it: the gap is the training forward's
            stats[SAMPLER_TRAINER_GAP] = ((batch.sampler_logps.to(device) - old).abs() * mask).sum() / mask.sum().clamp_min(1)
    share = float(mask.sum()) / global_num_tokens
    return loss, {k: float(v) * share for k, v in stats.items()}


@dataclass(frozen=True)
class PreferenceObjective:
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    @classmethod
    def from_settings(cls, settings) -> PreferenceObjective:
        return cls(loss_type=settings.loss_type, beta=settings.beta, label_smoothing=settings.label_smoothing,
                   sft_weight=settings.sft_weight, simpo_gamma=settings.simpo_gamma,
                   kto_desirable_weight=settings.kto_desirable_weight,
                   kto_undesirable_weight=settings.kto_undesirable_weight)


@dataclass(frozen=True)
class ResponseLogprobs:
    """Per-row log-probs of the response tokens: summed, their count, and the token-mean NLL."""

    total: torch.Tensor  # (N,) sum of log-probs over response tokens
    lengths: torch.Tensor  # (N,) response token counts

    @classmethod
    def from_tokens(cls, token_logps: torch.Tensor, mask: torch.Tensor) -> ResponseLogprobs:
        total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)
        return cls(total, mask.sum(-1).clamp_min(1).to(total.dtype))

    @property
    def average(self) -> torch.Tensor:
        return self.total / self.lengths

    @property
    def nll(self) -> torch.Tensor:
        return -self.average


def preference_loss(objective: PreferenceObjective, policy: ResponseLogprobs, reference: torch.Tensor | None,
                    batch, mismatched: ResponseLogprobs | None = None,
                    mismatched_reference: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-example losses (one per pair, or per KTO row) and stats for ``objective``.

    ``policy`` covers the batch's token rows (pairs: chosen rows then rejected rows); ``reference``
    the summed reference log-probs of the same rows (None for reference-free losses).
    """
    kind = objective.loss_type
    if kind == "kto":
        z0 = kto_reference_point(mismatched.total, mismatched_reference)
        return kto_loss(policy.total, reference, batch.desirable.to(policy.total.device), reference_point=z0,
                        beta=objective.beta, desirable_weight=objective.kto_desirable_weight,
                        undesirable_weight=objective.kto_undesirable_weight)
    half = policy.total.shape[0] // 2
    chosen, rejected = slice(0, half), slice(half, None)
    chosen_nll = policy.nll[chosen]
    if kind == "simpo":
        return simpo_loss(policy.average[chosen], policy.average[rejected], beta=objective.beta,
                          gamma=objective.simpo_gamma, label_smoothing=objective.label_smoothing,
                          sft_weight=objective.sft_weight, chosen_nll=chosen_nll)
    if kind == "orpo":
        return orpo_loss(policy.average[chosen], policy.average[rejected], chosen_nll, beta=objective.beta)
    if kind == "ipo":  # IPO compares per-token averaged log-probs (as TRL does)
        pol, ref = policy.average, reference / policy.lengths
    else:
        pol, ref = policy.total, reference
    return dpo_loss(pol[chosen], pol[rejected], ref[chosen], ref[rejected], beta=objective.beta,
                    loss_type=kind, label_smoothing=objective.label_smoothing,
                    sft_weight=objective.sft_weight, chosen_nll=chosen_nll)
