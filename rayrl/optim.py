"""Learning-rate schedules and optimizer parameter groups (pure, shared by every stage)."""

from __future__ import annotations

import math
from typing import Literal


def lr_multiplier(step: int, *, schedule: Literal["constant", "linear", "cosine"], warmup_steps: int,
                  total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over ``warmup_steps``, then constant, linear or cosine decay
    to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def decay_param_groups(named_parameters, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors), as is common practice."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
