"""The partial-credit addition reward both sides of ``benchmarks/trl_compare.py`` score with.

1.0 for the exact sum as the completion's first number; otherwise half the share of the answer's digits
that the first number gets right, aligned from the ones place; 0.0 without a number.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+")


def partial_credit(prompt: str, completion: str, answer: str, **fields) -> float:
    found = _NUMBER.search(completion)
    if found is None:
        return 0.0
    guess, want = found.group(0), str(answer).strip()
    if guess == want:
        return 1.0
    right = sum(a == b for a, b in zip(reversed(guess), reversed(want)))
    return 0.5 * right / max(len(want), len(guess))


def partial_credit_batch(prompts: list, completions: list, answer: list, **fields) -> list[float]:
    """TRL's reward-function form: lists in, one score per completion."""
    return [partial_credit(p, c, a) for p, c, a in zip(prompts, completions, answer, strict=True)]
