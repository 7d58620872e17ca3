"""Verifier: a CPU actor scoring completions with rule-based rewards and user functions.

Several of them form the verifier pool; the controller splits each batch across the pool. Reward
functions that raise or time out give a counted failure and their fallback score (see
rayrl.rewards.scoring), never a crashed run.
"""

from __future__ import annotations

from rayrl.rewards.scoring import RewardScorer, RewardSpec, ScoreResult


class Verifier:
    def __init__(self, specs: list[RewardSpec], base_dir: str | None = None):
        self.scorer = RewardScorer(specs, base_dir=base_dir)
        self.scorer.load()  # resolve every function now: a bad spec fails at start, not mid-run

    def score(self, prompts: list[str], completions: list[str], fields: list[dict]) -> ScoreResult:
        return self.scorer.score(prompts, completions, fields)
