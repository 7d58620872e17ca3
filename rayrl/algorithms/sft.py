"""Supervised fine-tuning loss."""

from __future__ import annotations

from torch import Tensor

from .aggregation import aggregate_loss, masked_mean

__all__ = ["sft_loss"]


def sft_loss(
    token_logps: Tensor, mask: Tensor, *, global_num_tokens: float | Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked negative log-likelihood: ``L = -sum_t m_t log pi(y_t | y_<t) / sum_t m_t``.

    Token mean over the completion (or all trained) tokens, as ``transformers``' causal-LM loss
    with ``-100`` labels. ``global_num_tokens`` makes the result this micro-batch's share of the
    step-wide token mean (see ``aggregate_loss``), which is what HF's ``num_items_in_batch`` does.

    Returns ``(loss, stats)``; stats are detached local values: ``nll`` (local token mean) and
    ``num_tokens``.
    """
    loss = aggregate_loss(-token_logps, mask, mode="token_mean", global_num_tokens=global_num_tokens)
    stats = {
        "nll": masked_mean(-token_logps.detach(), mask),
        "num_tokens": mask.bool().sum().detach(),
    }
    return loss, stats
