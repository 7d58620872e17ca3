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
from rayrl.remote import RemoteCallTimeout, RoleFailed, gather
from rayrl.weight_sync import PendingPush, WeightPusher, WeightSyncError

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


@dataclass
class PendingCheck:
    """A probe check started after a push (``SyncGuard.start``): the trainer's log-probs of the pushed
    weights, and each worker's probe call, queued behind its load."""

    version: int
    seconds: float  # spent starting it
    trainer_logps: torch.Tensor
    targets: list[tuple[int, Any]]  # (worker index, the worker's handle then)
    probes: list  # one sequence_logprobs ref per target


class SyncGuard:
    """Checks each engine against the trainer after every ``every``-th push: ``start`` right after the
    push was started, ``finish`` before the next one (at once in sync mode)."""

    def __init__(self, probe: ProbeBatch, *, tolerance: float, every: int, trainers: PolicyTrainerGroup,
                 rollout: RolloutPool, pad_id: int, deadline_s: float):
        self.probe, self.tolerance, self.every = probe, tolerance, every
        self.trainers, self.rollout, self.pad_id, self.deadline_s = trainers, rollout, pad_id, deadline_s
        heads, tails = probe.heads, probe.tails
        self._tokens, _ = completion_tokens(heads, tails, [[0.0] * len(t) for t in tails], pad_id)
        self._sequences = [h + t for h, t in zip(heads, tails)]

    def due(self, version: int) -> bool:
        return self.every > 0 and bool(self.probe.heads) and version % self.every == 0

    def check(self, version: int, repush: Callable[[], Any]) -> dict[str, float]:
        """``start`` and ``finish`` at once."""
        return self.finish(self.start(version), repush)

    def start(self, version: int) -> PendingCheck | None:
        """The trainer's probe log-probs now (it holds ``version``), and every worker's probe call, queued
        behind its load of ``version``; None when no check is due."""
        if not self.due(version):
            return None
        started = time.perf_counter()
        trainer = self.trainers.token_logprobs(self._tokens, micro_batch_size=len(self._sequences), temperature=1.0)
        targets = list(enumerate(self.rollout.workers))
        probes = [worker.sequence_logprobs.remote(self._sequences, [1] * len(self._sequences), min_version=version)
                  for _, worker in targets]
        return PendingCheck(version, time.perf_counter() - started, trainer, targets, probes)

    def finish(self, pending: PendingCheck | None, repush: Callable[[], Any], behind_s: float = 0.0) -> dict[str, float]:
        """``sync/verify_max_abs_diff`` (and its time) of a started check, re-pushing once (``repush``: the
        same version again) on a mismatch; raises ``WeightSyncError`` if it persists. A worker that failed
        or was replaced meanwhile is restarted as needed and probed again."""
        if pending is None:
            return {}
        started = time.perf_counter()
        workers = self.rollout.workers
        if all(i < len(workers) and workers[i] is handle for i, handle in pending.targets) and \
                len(pending.targets) == len(workers):
            try:
                engine = gather(pending.probes, who=[self.rollout.who[i] for i, _ in pending.targets],
                                doing="scoring the weight-sync probe", deadline_s=self.deadline_s + behind_s,
                                setting="fault.timeouts.sync_s")
            except (RoleFailed, RemoteCallTimeout) as failure:
                if not self.rollout.actors.recover(failure):
                    raise
                engine = self._probe_all(pending.version, behind_s)
        else:
            engine = self._probe_all(pending.version, behind_s)
        gaps = self._gaps(pending.trainer_logps, engine)
        worst = max(gaps)
        if worst > self.tolerance:
            _log.warning("after the push of version %d, %s's log-probs differ from the trainer's by %.3g "
                         "(sync.verify_tolerance %g): pushing again", pending.version,
                         self.rollout.who[gaps.index(worst)].describe(), worst, self.tolerance)
            repush()
            gaps = self._gaps(pending.trainer_logps, self._probe_all(pending.version, behind_s))
            worst = max(gaps)
            if worst > self.tolerance:
                who = self.rollout.who[gaps.index(worst)].describe()
                raise WeightSyncError(
                    f"{who}: its log-probs of the probe batch differ from the trainer's by up to {worst:.3g} "
                    f"(sync.verify_tolerance {self.tolerance:g}) after version {pending.version} was pushed twice: "
                    "the engine does not serve the trainer's weights")
        return {"sync/verify_max_abs_diff": worst, "time/sync_verify": pending.seconds + time.perf_counter() - started}

    def _probe_all(self, version: int, behind_s: float = 0.0) -> list:
        return self.rollout.actors.call_all(
            lambda worker: worker.sequence_logprobs.remote(self._sequences, [1] * len(self._sequences),
                                                           min_version=version),
            "scoring the weight-sync probe", self.deadline_s + behind_s)

    def _gaps(self, trainer: torch.Tensor, per_worker: list) -> list[float]:
        """Per rollout worker, the largest |engine - trainer| log-prob on the probe."""
        heads, tails = self.probe.heads, self.probe.tails
        mask = self._tokens.loss_mask[:, 1:]
        return [max_logprob_gap(trainer, completion_tokens(heads, tails, engine, self.pad_id)[1], mask)
                for engine in per_worker]


class EngineSync:
    """Phase 6 of a step: the new weights into the engines, then the guard's probe check.

    ``wait_at_once`` (sync mode): the trainer waits for the loads and the check before it goes on. Else
    (async mode) they run while the workers go on; each worker loads before any later call reaches it,
    so a chunk started after ``push`` samples the new version. The trainer then waits for them (and
    gets their metrics) before its next push, or ``wait`` before an eval, a resize or the end."""

    def __init__(self, pusher: WeightPusher, guard: SyncGuard, *, wait_at_once: bool, behind_s: float = 0.0):
        """``behind_s`` (async mode): how long a worker's chunk in flight may hold up its load and probe,
        on top of ``fault.timeouts.sync_s``."""
        self.pusher, self.guard, self.wait_at_once, self.behind_s = pusher, guard, wait_at_once, behind_s
        self.actors = guard.rollout.actors
        self.retry = self.actors.retry  # an operation redone after the workers it names as failed are replaced
        self._pending: tuple[PendingPush, PendingCheck | None] | None = None

    def push(self, version: int) -> dict[str, float]:
        """Start pushing ``version``, after waiting for the previous push. Metrics: the push's in sync
        mode, the previous one's in async mode; ``time/sync`` is what the trainer spent on pushes here."""
        started = time.perf_counter()
        metrics = self.wait()
        with self.actors.settled():  # async: a worker being replaced on the scheduler's thread is up first
            push = self.retry(lambda: self.pusher.start(version))
            self._pending = (push, self.guard.start(version))
        if self.wait_at_once:
            metrics = self.wait()
        metrics["time/sync"] = time.perf_counter() - started
        if "sync/bytes" in metrics:
            metrics["sync/gb_per_s"] = metrics["sync/bytes"] / max(metrics["time/sync"], 1e-9) / 1e9
        return metrics

    def wait(self) -> dict[str, float]:
        """Wait for the push in flight and its check: ``sync/bytes`` (per worker) and the check's
        ``sync/verify_max_abs_diff`` and ``time/sync_verify``."""
        if self._pending is None:
            return {}
        push, check = self._pending
        self._pending = None
        _, nbytes = self.retry(lambda: self.pusher.finish(push, self.behind_s))
        metrics = {"sync/bytes": float(nbytes)}
        metrics.update(self.guard.finish(check, repush=lambda: self.retry(lambda: self.pusher.load_again(push.version)),
                                         behind_s=self.behind_s))
        return metrics

    def abandon(self) -> None:
        """Forget the push in flight (the run goes back to a checkpoint and pushes that)."""
        self._pending = None
