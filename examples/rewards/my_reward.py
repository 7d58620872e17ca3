"""Example user reward functions for rayrl.

Use them from a config or a RewardSpec with a ``path/to/file.py:function`` spec, e.g.::

    RewardSpec(name="answer", fn="examples/rewards/my_reward.py:answer_reward", weight=1.0)
    RewardSpec(name="brevity", fn="examples/rewards/my_reward.py:brevity_penalty", weight=0.1)

Contract: ``fn(prompt, completion, **fields) -> float``; ``fields`` are the dataset row's extra
columns (here ``answer``). Raising, hanging past the spec's ``timeout_s`` or returning a
non-number counts as a failure and scores the spec's ``fallback`` instead.
"""

from __future__ import annotations

import re


def answer_reward(prompt: str, completion: str, answer: str, **fields) -> float:
    """1.0 if the last line of the completion contains the reference answer, 0.5 if it appears
    anywhere else, 0.0 otherwise (case-insensitive)."""
    text = completion.strip().lower()
    target = str(answer).strip().lower()
    if not target:
        return 0.0
    lines = text.splitlines() or [""]
    if target in lines[-1]:
        return 1.0
    return 0.5 if target in text else 0.0


def brevity_penalty(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """A batched reward: minus the number of words beyond 200, scaled to [-1, 0]."""
    excess = [max(0, len(re.findall(r"\S+", c)) - 200) for c in completions]
    return [-min(1.0, e / 200) if e else 0.0 for e in excess]


brevity_penalty.batched = True
