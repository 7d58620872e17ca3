"""Scoring generated answers for held-out evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def normalize_answer(text: str) -> str:
    """Exact match up to surrounding whitespace."""
    return text.strip()


def exact_match_accuracy(predictions: list[str], references: list[str | None]) -> float:
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r is not None]
    if not pairs:
        return float("nan")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / len(pairs)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_k_metrics(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """``eval/pass@k`` averaged over prompts; ``correct[i]`` holds prompt i's samples."""
    if not correct:
        return {}
    out = {}
    for k in ks:
        out[f"eval/pass@{k}"] = sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)
    return out
