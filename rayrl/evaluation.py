"""Scoring generated answers for held-out evaluation."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Exact match up to surrounding whitespace."""
    return text.strip()


def exact_match_accuracy(predictions: list[str], references: list[str | None]) -> float:
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r is not None]
    if not pairs:
        return float("nan")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / len(pairs)
