"""Exact-match reward: ``completion.strip() == str(answer).strip()`` gives 1.0, else 0.0.

``exact_match`` is case-sensitive; ``make_exact_match(case_sensitive=False)`` builds a
case-insensitive variant (also reachable from a :class:`~rayrl.rewards.scoring.RewardSpec`
with ``options={"case_sensitive": False}``).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["exact_match", "make_exact_match"]


def make_exact_match(*, case_sensitive: bool = True) -> Callable[..., float]:
    """Factory: an exact-match reward, optionally case-insensitive (``str.casefold``)."""

    def exact_match(prompt: str, completion: str, answer: Any = None, **fields: Any) -> float:
        """1.0 if the stripped completion equals the stripped ``answer`` field, else 0.0."""
        if answer is None:
            raise ValueError("exact_match needs an 'answer' field in the dataset row")
        got, want = str(completion).strip(), str(answer).strip()
        if not case_sensitive:
            got, want = got.casefold(), want.casefold()
        return 1.0 if got == want else 0.0

    return exact_match


exact_match = make_exact_match()
