"""Phases 1-2 of an RL step: generate a step's groups and score them, with DAPO's refill rounds.

``StepSampling`` is one step's rounds as a state machine: it says which prompts a round samples (and
with which seed), and takes back the round's completions and scores to decide the next round (DAPO:
zero-variance groups are replaced by fresh prompts) or the step's samples. Whoever runs the rounds
drives it: ``sample_step`` one round after the other (``rollout.mode: sync``), or the asynchronous
``rayrl.rollout_scheduler`` chunk by chunk, several steps at once. The rounds, prompts and seeds are
the same either way, which is what makes async at ``max_staleness: 0`` the sync loop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from rayrl.actors.rollout_worker import Completion, SamplingSettings
from rayrl.config import PolicySettings
from rayrl.data.batch import TokenBatch
from rayrl.data.rollout import PromptRow, completion_tokens
from rayrl.rewards.scoring import ScoreResult
from rayrl.rl_roles import RolloutPool

Score = Callable[[list[PromptRow], list[Completion]], ScoreResult]


@dataclass
class Rollout:
    """One step's samples and scores (one row per completion)."""

    prompts: list[PromptRow]  # one per completion
    completions: list[Completion]
    scores: ScoreResult

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor(self.scores.total, dtype=torch.float32)

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool: False where a reward with ``on_failure: exclude`` has no score (advantage 0)."""
        return ~torch.tensor(self.scores.excluded_mask, dtype=torch.bool)

    @property
    def overlong(self) -> torch.Tensor:
        """(N,) bool: cut at max_new_tokens."""
        return torch.tensor([c.finish_reason == "length" for c in self.completions])

    def token_batch(self, pad_id: int) -> tuple[TokenBatch, torch.Tensor]:
        """Prompt+completion rows (loss on the completion) and the sampler's log-probs aligned to them."""
        return completion_tokens([c.prompt_ids for c in self.completions], [c.token_ids for c in self.completions],
                                 [c.logprobs for c in self.completions], pad_id)


@dataclass
class StepSamples:
    """What the trainer takes for one step: the samples, their sampling stats and the phases' times."""

    step: int
    rollout: Rollout
    stats: dict[str, float]  # failure/timeout rates over everything scored, zero-variance share, unfilled groups
    times: dict[str, float]  # time/generate, time/reward


GroupSamples = tuple[PromptRow, list[Completion], ScoreResult]


class StepSampling:
    """One step's generation rounds: round 0 samples the step's ``prompts``; with
    ``settings.dynamic_sampling`` each further round (up to ``settings.max_sampling_rounds``) replaces the
    zero-variance groups kept back so far by fresh prompts, oversampled by the share of groups kept."""

    def __init__(self, settings: PolicySettings, group_size: int, seed: int, step: int, prompts: list[PromptRow],
                 all_prompts: list[PromptRow], sampling: SamplingSettings):
        self.settings, self.group_size, self.seed, self.step = settings, group_size, seed, step
        self.all_prompts, self.sampling = all_prompts, sampling
        self.prompts = prompts  # this round's
        self.round_index = 0
        self.done = False
        self.times = {"time/generate": 0.0, "time/reward": 0.0}
        self._rng = random.Random(seed * 7_919 + step)
        self._drawn = {id(p) for p in prompts}  # refills draw prompts not yet in this step
        self._kept: list[GroupSamples] = []
        self._spare: list[GroupSamples] = []
        self._scored: list[ScoreResult] = []
        self._first_zero_frac = 0.0

    def round_sampling(self) -> SamplingSettings:
        """This round's sampling settings: its own seed (per-request seeds add the prompt's index)."""
        return replace(self.sampling, seed=sampling_seed(self.seed, self.step, self.round_index))

    def round_rows(self) -> list[PromptRow]:
        """One prompt row per completion of this round, in completion order."""
        return [p for p in self.prompts for _ in range(self.group_size)]

    def finish_round(self, completions: list[Completion], scores: ScoreResult) -> None:
        """Take this round's completions (prompt-major) and scores; start the next round or finish."""
        settings, group_size = self.settings, self.group_size
        self._scored.append(scores)
        zero = zero_variance_groups(torch.tensor(scores.total), group_size,
                                    ~torch.tensor(scores.excluded_mask, dtype=torch.bool))
        if self.round_index == 0:
            self._first_zero_frac = float(zero.float().mean())
        for g, prompt in enumerate(self.prompts):
            rows = slice(g * group_size, (g + 1) * group_size)
            entry = (prompt, completions[rows], scores.slice(rows.start, rows.stop))
            (self._spare if (settings.dynamic_sampling and zero[g]) else self._kept).append(entry)
        wanted, kept = settings.prompts_per_step, len(self._kept)
        rounds = settings.max_sampling_rounds if settings.dynamic_sampling else 1
        self.round_index += 1
        if kept >= wanted or self.round_index >= rounds:
            self.done = True
            return
        sampled = kept + len(self._spare)
        fresh = [p for p in self.all_prompts if id(p) not in self._drawn]
        self.prompts = self._rng.sample(fresh, min(len(fresh), math.ceil((wanted - kept) * sampled / max(kept, sampled / 4))))
        self._drawn.update(id(p) for p in self.prompts)
        self.done = not self.prompts

    def result(self) -> StepSamples:
        """The step's samples (call when ``done``): the groups kept, topped up with zero-variance ones."""
        wanted, group_size = self.settings.prompts_per_step, self.group_size
        filled = self._kept[:wanted]
        filled += self._spare[:wanted - len(filled)]  # out of rounds: keep zero-variance groups (advantage 0)
        samples = Rollout([prompt for prompt, _, _ in filled for _ in range(group_size)],
                          [c for _, completions, _ in filled for c in completions],
                          ScoreResult.concat([group_scores for _, _, group_scores in filled]))
        # failure and timeout rates over everything scored this step (dropped groups included)
        stats = {k: v for k, v in ScoreResult.concat(self._scored).metrics().items()
                 if k.endswith(("failure_rate", "timeout_rate", "not_applicable_rate"))}
        if group_size > 1:
            stats["groups/zero_variance_frac"] = self._first_zero_frac
        if self.settings.dynamic_sampling:
            stats["groups/unfilled"] = float(max(0, wanted - len(self._kept)))
        return StepSamples(self.step, samples, stats, dict(self.times))


def sample_step(settings: PolicySettings, group_size: int, seed: int, step: int, prompts: list[PromptRow],
                all_prompts: list[PromptRow], rollout: RolloutPool, score: Score,
                sampling: SamplingSettings) -> tuple[Rollout, dict[str, float], dict[str, float]]:
    """Generate and score this step's ``prompts`` (``run_rounds``). Returns the samples, their sampling
    stats and the phases' times."""
    result = run_rounds(StepSampling(settings, group_size, seed, step, prompts, all_prompts, sampling), rollout, score)
    return result.rollout, result.stats, result.times


def run_rounds(state: StepSampling, rollout: RolloutPool, score: Score) -> StepSamples:
    """A step's rounds, one after the other: each generated on the whole pool, its chunks scored as they
    are generated."""
    while not state.done:
        scored = rollout.generate_scored([p.prompt_ids for p in state.prompts], state.round_sampling(),
                                         state.round_rows(), score)
        state.times["time/generate"] += scored.generate_s
        state.times["time/reward"] += scored.score_s
        state.finish_round(scored.completions, scored.scores)
    return state.result()


def zero_variance_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(num_groups,) True where every (valid) sample of a group got the same reward (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    if valid is None:
        return (grouped.max(-1).values - grouped.min(-1).values) == 0
    kept = valid.view(-1, group_size)
    return ~(grouped.masked_fill(~kept, -math.inf).amax(-1) > grouped.masked_fill(~kept, math.inf).amin(-1))


def sampling_seed(seed: int, step: int, round_index: int) -> int:
    """The sampling seed of one rollout round: a hash, so no two (step, round) pairs share per-prompt
    seeds (seeds that differ by small integers did: the engine adds the prompt index)."""
    return int(np.random.SeedSequence([seed, step, round_index]).generate_state(1, np.uint32)[0] >> 1)
