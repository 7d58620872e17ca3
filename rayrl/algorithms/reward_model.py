"""Pairwise (Bradley-Terry) reward-model loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reward_model_loss"]


def reward_model_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
    global_num_pairs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss (Ouyang et al. 2022, InstructGPT Eq. 1), with optional margin and centring.

    ``L = mean_i [ -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 ]``

    - ``margin`` (Llama 2, Touvron et al. 2023): a per-pair (B,) or scalar preference margin.
    - ``center_coef``: reward centring of Eisenstein et al. 2023 ("Helping or Herding?"), which
      pins the otherwise shift-invariant rewards near zero; TRL's
      ``center_rewards_coefficient`` (they suggest 0.01). Default 0 = off, as TRL.
    - ``global_num_pairs``: divide the sum by this step-wide count instead of the local batch
      size (gradient accumulation / data parallelism; see ``aggregate_loss``).

    ``chosen_rewards``/``rejected_rewards`` are (B,) scalar rewards. Returns ``(loss, stats)``
    with detached ``accuracy`` (fraction r_c > r_r), ``margin`` (mean r_c - r_r),
    ``chosen``, ``rejected`` (mean rewards).
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    per_pair = -F.logsigmoid(logits)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_rewards + rejected_rewards) ** 2
    denom = per_pair.numel() if global_num_pairs is None else global_num_pairs
    loss = per_pair.sum() / torch.as_tensor(denom, dtype=per_pair.dtype, device=per_pair.device)
    d = diff.detach()
    stats = {
        "accuracy": (d > 0).float().mean(),
        "margin": d.mean(),
        "chosen": chosen_rewards.detach().mean(),
        "rejected": rejected_rewards.detach().mean(),
    }
    return loss, stats
