"""Where the RL loop's samples come from: ``SyncRollouts`` samples each step when the trainer asks for it
(``rollout.mode: sync``); ``AsyncRollouts`` keeps the rollout workers generating the next steps while
the trainer trains (``rollout.mode: async``), within a bound on staleness.

The asynchronous scheduler runs on a thread of the driver::

    admission ──► chunk queue ──► rollout workers (a chunk on each free worker, re-issued if one fails)
       │ step s starts only while s <= published version + max_staleness
       ▼
    finished chunks ──► scoring (one thread: verifiers / reward models, a chunk as soon as it is generated)
       ▼
    a step's rounds complete (DAPO refills queued first in line) ──► buffer of finished steps ──► take(s)

Versions. The trainer trains step ``s`` with policy version ``s`` (``s`` updates done) and publishes
version ``s + 1`` after its push. A step is admitted (its groups may start) only once the published
version is at least ``s - max_staleness``, so every sample of step ``s`` was drawn by a policy at most
``max_staleness`` versions older than the one trained on it: staleness is bounded by admission, never by
throwing finished work away (a long completion is not starved). With ``max_staleness: 0`` step ``s``
starts after version ``s`` is published, in the same chunks, prompts and seeds as the sync loop's
``sample_step``: the same samples, bit for bit.

A weight push does not wait for the workers: each loads the new weights after its chunk in flight,
which finishes under the weights it started with (``rollout.partial_rollouts: false``), or between two
engine steps of it, the requests going on under the new weights (``true``; see
:mod:`rayrl.actors.rollout_worker`), and before any chunk sent after the push
(``rayrl.sync_guard.EngineSync``); every completion records the version that started it (and, partial,
where each later version took over).
``paused`` (no chunk running) is for what needs the workers to itself: eval, a resize.

Each step's prompts are fixed by the step number (``StepBatcher``), so a resumed run re-issues the groups
that were in flight when it stopped (steps after the checkpoint): none lost, none trained twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from rayrl.actors.rollout_worker import Completion
from rayrl.data.rollout import PromptRow
from rayrl.recovery import CallStream
from rayrl.remote import RemoteCallTimeout
from rayrl.rewards.scoring import ScoreResult
from rayrl.rl_roles import RolloutPool, timed_score
from rayrl.rl_sampling import Score, StepSampling, StepSamples, run_rounds

_log = logging.getLogger(__name__)

IDLE_WAKE_S = 1.0  # with nothing running, the scheduler thread still looks around this often


@dataclass(frozen=True)
class RolloutFlow:
    """How the samples of one step flowed: what the trainer waited, what the workers idled."""

    trainer_wait_s: float  # the trainer waiting for this step's samples
    rollout_idle_s: float  # summed over workers, since the previous step's samples were taken
    buffer_groups: int  # scored groups of later steps, ready when this step's were taken

    def metrics(self) -> dict[str, float]:
        return {"time/trainer_wait": self.trainer_wait_s, "time/rollout_idle": self.rollout_idle_s,
                "async/buffer_groups": float(self.buffer_groups)}


NewStep = Callable[[int], StepSampling]


class SyncRollouts:
    """``rollout.mode: sync``: a step's samples are generated and scored when the trainer takes them."""

    def __init__(self, rollout: RolloutPool, score: Score, new_step: NewStep):
        self.rollout, self.score, self.new_step = rollout, score, new_step
        self._last_taken: float | None = None

    def take(self, step: int) -> tuple[StepSamples, RolloutFlow]:
        start = time.perf_counter()
        samples = run_rounds(self.new_step(step), self.rollout, self.score)
        end = time.perf_counter()
        # The workers idle from the previous step's samples until these were asked for, and while the last
        # chunks are scored (the earlier ones are scored while the others generate).
        between = 0.0 if self._last_taken is None else start - self._last_taken
        self._last_taken = end
        idle = len(self.rollout.workers) * (between + max(0.0, end - start - samples.times["time/generate"]))
        return samples, RolloutFlow(end - start, idle, 0)

    def publish(self, version: int) -> None:
        pass

    @contextmanager
    def paused(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class _Chunk:
    """Prompts [start, stop) of one round of one step."""

    state: StepSampling
    round_index: int
    start: int
    stop: int


@dataclass
class _Round:
    """A round's chunks as they come back: start -> (completions, scores)."""

    chunks: int
    started: float
    generated: dict[int, list[Completion]]
    scored: dict[int, ScoreResult]
    rows: list[PromptRow]  # one per completion of the round (built once: a round may have hundreds of chunks)
    last_generated: float = 0.0


class AsyncRollouts:
    """``rollout.mode: async``: a thread keeps the rollout workers busy with the admitted steps' chunks,
    scores each chunk as it finishes, and buffers finished steps until the trainer takes them."""

    def __init__(self, rollout: RolloutPool, score: Score, new_step: NewStep, *, first_step: int, total_steps: int,
                 max_staleness: int, group_size: int, take_deadline_s: float):
        """``first_step``: the step the trainer takes first (its policy version is published);
        ``take_deadline_s``: the longest the trainer waits for one step's samples (each generate and score
        call has its own deadline; this is the backstop that names the scheduler)."""
        self.rollout, self.score, self.new_step = rollout, score, new_step
        self.total_steps, self.max_staleness, self.take_deadline_s = total_steps, max_staleness, take_deadline_s
        self.group_size = group_size
        self._cond = threading.Condition()
        self._published = first_step
        self._next_step = first_step  # the next step to admit
        self._held = False  # no new chunk starts (a push, eval or resize is waiting for the workers)
        self._stopping = False
        self._doorbell: Future = Future()  # rung by the loop's thread: a publish, a pause, a stop
        self._error: BaseException | None = None
        self._ready: dict[int, StepSamples] = {}
        self._rounds: dict[tuple[int, int], _Round] = {}
        self._idle_s = 0.0
        self._stream = CallStream(rollout.actors)
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-scoring")
        self._scores: list[tuple[_Chunk, Future]] = []
        self._thread = threading.Thread(target=self._run, name="rollout-scheduler", daemon=True)
        self._thread.start()

    # ---- the loop's side -------------------------------------------------------------------------
    def take(self, step: int) -> tuple[StepSamples, RolloutFlow]:
        """Step ``step``'s samples, as soon as they are scored."""
        start = time.monotonic()
        with self._cond:
            while step not in self._ready:
                self._raise_if_failed()
                left = start + self.take_deadline_s - time.monotonic()
                if left <= 0:
                    raise RemoteCallTimeout(
                        f"the asynchronous rollout scheduler did not deliver step {step}'s samples within "
                        f"{self.take_deadline_s:.0f} s (each rollout and scoring call has its own deadline, "
                        f"fault.timeouts.generate_s / score_s; {len(self._stream.pending)} chunks in flight)")
                self._cond.wait(min(left, 1.0))
            samples = self._ready.pop(step)
            flow = RolloutFlow(time.monotonic() - start, self._idle_s,
                               sum(len(ready.rollout.completions) for ready in self._ready.values()) // self.group_size)
            self._idle_s = 0.0
        return samples, flow

    def publish(self, version: int) -> None:
        """The engines serve policy ``version``: admit the steps it allows, start chunks again."""
        with self._cond:
            self._published = version
            self._held = False
            self._ring()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No chunk starts and none is running inside this block (a weight push, eval, resize); what
        finishes meanwhile is still scored."""
        with self._cond:
            self._held = True
            self._ring()
            start = time.monotonic()
            while self._stream.pending:
                self._raise_if_failed()
                if time.monotonic() - start > self.take_deadline_s:
                    raise RemoteCallTimeout(f"the rollout workers' chunks in flight did not finish within "
                                            f"{self.take_deadline_s:.0f} s of a pause for a weight push")
                self._cond.wait(0.05)
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._ring()

    def stop(self) -> None:
        """End the thread; chunks in flight finish on their workers and are dropped."""
        with self._cond:
            self._stopping = True
            self._ring()
        self._thread.join(timeout=30)
        self._scoring.shutdown(wait=False, cancel_futures=True)

    def _ring(self) -> None:
        """Wake the scheduler thread (hold ``_cond``)."""
        if not self._doorbell.done():
            self._doorbell.set_result(None)
        self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive() and not self._stopping:
            raise RuntimeError("the asynchronous rollout scheduler's thread ended without an error")

    # ---- the scheduler thread --------------------------------------------------------------------
    def _run(self) -> None:
        last = time.monotonic()
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        return
                    if self._doorbell.done():
                        self._doorbell = Future()
                    self._admit()
                    held = self._held
                    doorbell = self._doorbell
                # Sleep until a chunk finishes, a score is ready or the loop rings (no polling).
                wake = [doorbell, *(future for _, future in self._scores[:1])]
                finished = self._stream.wait(None if self._stream.pending else IDLE_WAKE_S, dispatch=not held,
                                             wake=wake)
                now = time.monotonic()
                with self._cond:
                    self._idle_s += (len(self.rollout.workers) - len(self._stream.busy)) * (now - last)
                    self._cond.notify_all()  # paused() watches the chunks in flight
                last = now
                for chunk, completions in finished:
                    self._generated(chunk, completions)
                self._collect_scores()
        except BaseException as error:  # noqa: BLE001 - handed to the trainer's thread by take()
            _log.error("the asynchronous rollout scheduler failed: %r", error)
            with self._cond:
                self._error = error
                self._cond.notify_all()

    def _admit(self) -> None:
        while self._next_step < self.total_steps and self._next_step <= self._published + self.max_staleness:
            self._queue_round(self.new_step(self._next_step))
            self._next_step += 1

    def _queue_round(self, state: StepSampling, first: bool = False) -> None:
        prompt_ids = [p.prompt_ids for p in state.prompts]
        sampling = state.round_sampling()
        bounds = self.rollout.chunk_bounds(len(prompt_ids))
        self._rounds[(state.step, state.round_index)] = _Round(len(bounds), time.perf_counter(), {}, {},
                                                               state.round_rows())
        # The oldest policy that may start a sample of this step (partial rollouts: a push published
        # before the chunk may still be loading on the worker, which waits for it).
        oldest = max(0, state.step - self.max_staleness)
        calls = [(self.rollout.generate_call(prompt_ids, start, stop, sampling, min_version=oldest),
                  _Chunk(state, state.round_index, start, stop)) for start, stop in bounds]
        if first:  # a refill round of an earlier step goes before the later steps' chunks
            for call, chunk in reversed(calls):
                self._stream.queue.appendleft((call, chunk))
        else:
            for call, chunk in calls:
                self._stream.add(call, chunk)

    def _generated(self, chunk: _Chunk, completions: list[Completion]) -> None:
        state = chunk.state
        round_ = self._rounds[(state.step, chunk.round_index)]
        round_.last_generated = time.perf_counter()
        round_.generated[chunk.start] = completions
        rows = round_.rows[chunk.start * state.group_size:chunk.stop * state.group_size]
        self._scores.append((chunk, self._scoring.submit(timed_score, self.score, rows, completions)))

    def _collect_scores(self) -> None:
        while self._scores and self._scores[0][1].done():  # one scoring thread: they finish in order
            chunk, future = self._scores.pop(0)
            scores, seconds = future.result()
            state = chunk.state
            round_ = self._rounds[(state.step, chunk.round_index)]
            round_.scored[chunk.start] = scores
            state.times["time/reward"] += seconds
            if len(round_.scored) == round_.chunks:
                self._finish_round(state, round_)

    def _finish_round(self, state: StepSampling, round_: _Round) -> None:
        del self._rounds[(state.step, state.round_index)]
        starts = sorted(round_.generated)
        completions = RolloutPool.assemble([(start, round_.generated[start]) for start in starts], len(state.prompts),
                                           state.sampling.n)
        state.times["time/generate"] += round_.last_generated - round_.started
        state.finish_round(completions, ScoreResult.concat([round_.scored[start] for start in starts]))
        if not state.done:
            self._queue_round(state, first=True)
            return
        with self._cond:
            self._ready[state.step] = state.result()
            self._cond.notify_all()
