"""The weight-sync guard's second half (the first: per-tensor checksums on every push, in
``rayrl.weight_sync``). A push can arrive intact and still not be what the engine serves: a tensor
the engine's loader skipped or mapped to the wrong parameter, a stale prefix of a layerwise reload.
So after a push each engine scores a small fixed probe batch and its log-probs must match the
trainer's (``sync.verify_tolerance``); a mismatch re-pushes once, then stops the run naming the worker.

The probe: the first ``sync.probe_prompts`` training prompts, each scored after its first token. The
engine gives raw (T=1) log-probs of prompt tokens, so both sides are compared at T=1: weights that
agree there agree at any sampling temperature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rayrl.data.rollout import PromptRow, completion_tokens
from rayrl.rl_roles import RolloutPool
from rayrl.trainer_group import PolicyTrainerGroup
from rayrl.weight_sync import WeightSyncError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeBatch:
    """Sequences split into a one-token head and the tokens whose log-probs are compared."""

    heads: list[list[int]]
    tails: list[list[int]]

    @classmethod
    def from_prompts(cls, prompts: list[PromptRow], count: int) -> ProbeBatch:
        rows = [p.prompt_ids for p in prompts if len(p.prompt_ids) >= 2][:count]
        return cls([r[:1] for r in rows], [r[1:] for r in rows])


def max_logprob_gap(trainer_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """max |trainer - engine| over the compared (masked) tokens; inf if any is not finite (a NaN from a
    broken engine must fail the check, not slip past ``>``)."""
    gap = (trainer_logps - engine_logps).abs()[mask.bool()]
    if gap.numel() == 0:
        return 0.0
    return float(gap.max()) if bool(torch.isfinite(gap).all()) else float("inf")


class SyncGuard:
    """Checks each engine against the trainer after every ``every``-th push (``check``)."""

    def __init__(self, probe: ProbeBatch, *, tolerance: float, every: int, trainers: PolicyTrainerGroup,
                 rollout: RolloutPool, pad_id: int, deadline_s: float):
        self.probe, self.tolerance, self.every = probe, tolerance, every
        self.trainers, self.rollout, self.pad_id, self.deadline_s = trainers, rollout, pad_id, deadline_s

    def due(self, version: int) -> bool:
        return self.every > 0 and bool(self.probe.heads) and version % self.every == 0

    def check(self, version: int, repush: Callable[[], Any]) -> dict[str, float]:
        """After pushing ``version``: ``sync/verify_max_abs_diff`` (and its time), re-pushing once
        (``repush``) on a mismatch; raises ``WeightSyncError`` if it persists."""
        if not self.due(version):
            return {}
        started = time.perf_counter()
        gaps = self.gaps()
        worst = max(gaps)
        if worst > self.tolerance:
            _log.warning("after the push of version %d, %s's log-probs differ from the trainer's by %.3g "
                         "(sync.verify_tolerance %g): pushing again", version,
                         self.rollout.who[gaps.index(worst)].describe(), worst, self.tolerance)
            repush()
            gaps = self.gaps()
            worst = max(gaps)
            if worst > self.tolerance:
                who = self.rollout.who[gaps.index(worst)].describe()
                raise WeightSyncError(
                    f"{who}: its log-probs of the probe batch differ from the trainer's by up to {worst:.3g} "
                    f"(sync.verify_tolerance {self.tolerance:g}) after version {version} was pushed twice: the "
                    "engine does not serve the trainer's weights")
        return {"sync/verify_max_abs_diff": worst, "time/sync_verify": time.perf_counter() - started}

    def gaps(self) -> list[float]:
        """Per rollout worker, the largest |engine - trainer| log-prob on the probe."""
        heads, tails = self.probe.heads, self.probe.tails
        zeros = [[0.0] * len(t) for t in tails]
        tokens, _ = completion_tokens(heads, tails, zeros, self.pad_id)
        mask = tokens.loss_mask[:, 1:]
        trainer = self.trainers.token_logprobs(tokens, temperature=1.0)
        per_worker = self.rollout.actors.call_all(
            lambda worker: worker.sequence_logprobs.remote([h + t for h, t in zip(heads, tails)], [1] * len(heads)),
            "scoring the weight-sync probe", self.deadline_s)
        return [max_logprob_gap(trainer, completion_tokens(heads, tails, engine, self.pad_id)[1], mask)
                for engine in per_worker]
