"""Which preference loss to apply to a batch's log-probs: the dispatch from a stage's settings to the
pure functions of rayrl.algorithms (DPO family, SimPO, ORPO, KTO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayrl.algorithms import dpo_loss, kto_loss, kto_reference_point, orpo_loss, simpo_loss

REFERENCE_FREE = ("simpo", "orpo")


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
