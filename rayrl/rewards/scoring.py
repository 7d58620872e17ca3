"""Weighted combination of reward functions with failure handling and timeouts.

:class:`RewardScorer` is built from :class:`RewardSpec` s (plain, picklable data). Functions are
resolved lazily (:func:`~rayrl.rewards.registry.load_reward_function`) in the process that
scores, so a scorer can be shipped to a Ray actor (the VerifierPool) and loaded there.

``score(prompts, completions, fields)`` returns a :class:`ScoreResult`::

    total[i]               = sum(spec.weight * per_function[spec.name][i] for spec in specs)
    per_function[name][i]  = the function's score, or spec.fallback if it failed or returned None
    failures[name]         = items that failed (raised, timed out, or returned a non-number)
    timeouts[name]         = the subset of failures that were timeouts
    not_applicable[name]   = items the function returned None for ("does not apply", as in TRL)
    excluded[i]            = a function with ``on_failure="exclude"`` has no score for item i

Failure policy: a reward function that raises, exceeds its ``timeout_s``, or returns something
that is not a finite real number (a string, NaN, inf) fails for that item; ``None`` means the
function does not apply to it. Either way the item gets the spec's ``fallback`` and is counted
(``on_failure="fallback"``, the default), or, with ``on_failure="exclude"``, it is marked
``excluded``: the RL loop leaves it out of its group's statistics and gives it advantage 0. Scoring
carries on; it never crashes the run. Only
configuration errors (an unresolvable spec, mismatched input lengths) raise. Finite scores are
clipped to ``[-MAX_ABS_SCORE, MAX_ABS_SCORE]``: a 1e308 times a weight must not become an inf total.

How timeouts are enforced (``isolation="fork"``, the default):

* Per ``score`` call up to ``concurrency`` child processes are forked (``multiprocessing`` "fork"
  context; the functions, prompts and fields are inherited, nothing is pickled on the way in),
  each taking every ``concurrency``-th job, so that items that time out are paid side by side,
  not one after another. A child evaluates its (function, item) jobs one by one, each under a ``signal.setitimer(ITIMER_REAL,
  timeout_s)`` alarm whose handler raises :class:`RewardTimeout` (a ``BaseException``, so a
  bare ``except Exception`` in user code does not swallow it), and streams ``(job, status,
  value)`` back through a pipe as each job finishes.
* The parent watches the pipe with a per-job deadline (``timeout_s + grace_s`` since the last
  result). If the child wedges where a Python signal cannot interrupt it (a long C call, a
  swallowed timeout, a deadlock inherited through ``fork``) or dies (segfault, ``os._exit``),
  the parent SIGKILLs it, records the job in flight as timed out (or failed, if the child
  died), and forks a fresh child for the remaining jobs. So one bad item costs at most
  ``timeout_s + grace_s``; the rest are still scored.
* A child's stdout and stderr go to a pipe the parent drains: at most ``output_limit`` bytes of
  it reach the scoring process's own output (a function printing a gigabyte costs the drain, not
  the logs or the disk). When a child is done or killed, every process it started is killed too:
  its process group and, walking ``/proc``, descendants that left the group (``setsid``).
* A batched function (``fn.batched = True``) is one job: ``timeout_s`` applies to the whole
  call, and a failure falls back (and counts) for every item of the batch. Individual
  non-numeric entries of its returned list fall back one by one.
* ``timeout_s=None`` on a spec runs that function in the scoring process itself (no fork,
  no timeout; exceptions are still caught): for cheap, trusted functions. The trusted built-ins
  (``math_answer``, ``exact_match``: ``registry.TRUSTED_BUILTINS``) always run so.
* ``isolation="none"`` runs everything in-process (debugging; no timeouts at all).

Fields: each row dict's keys are passed as keyword arguments (``fn(prompt, completion,
**row)``); keys named ``prompt`` or ``completion`` are dropped. For batched functions every key
seen in any row becomes a list (missing values are None).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from rayrl.rewards.code_sandbox import cleanup_stale_sandbox_dirs, kill_process_group, network_namespace_prefix
from rayrl.rewards.registry import TRUSTED_BUILTINS, RewardSpecError, is_batched, load_reward_function

__all__ = ["RewardScorer", "RewardSpec", "RewardTimeout", "ScoreResult"]

logger = logging.getLogger(__name__)

_RESERVED_FIELDS = ("prompt", "completion")
_MAX_ERROR_SAMPLES = 3
MAX_ABS_SCORE = 1e6  # finite scores are clipped to +-this


class RewardTimeout(BaseException):
    """Raised inside the scoring child when a reward function exceeds its ``timeout_s``."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward function in a weighted combination.

    Attributes:
        name: unique key in :class:`ScoreResult` (e.g. ``"correct"``).
        fn: spec string for :func:`~rayrl.rewards.registry.load_reward_function`: a built-in
            name, ``"path/to/file.py:fn"`` or ``"module:fn"``.
        weight: multiplier in the total.
        timeout_s: per-item limit in seconds (whole call for batched functions); None runs the
            function in-process without a timeout.
        fallback: score used when the function fails for an item (or returns None).
        on_failure: "fallback" (use ``fallback``) or "exclude" (mark the item ``excluded``).
        options: if set, ``fn`` names a factory called with these keyword arguments (e.g.
            ``RewardSpec("em", "exact_match", options={"case_sensitive": False})``).
    """

    name: str
    fn: str
    weight: float = 1.0
    timeout_s: float | None = 10.0
    fallback: float = 0.0
    options: Mapping[str, Any] | None = None
    on_failure: str = "fallback"

    def __post_init__(self) -> None:
        if self.on_failure not in ("fallback", "exclude"):
            raise ValueError(f"RewardSpec {self.name!r}: on_failure must be 'fallback' or 'exclude', "
                             f"got {self.on_failure!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.fn, str) or not self.fn.strip():
            raise ValueError(f"RewardSpec {self.name!r}: fn must be a spec string, got {self.fn!r}")
        for attr in ("weight", "fallback"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"RewardSpec {self.name!r}: {attr} must be a finite number, got {value!r}")
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, numbers.Real) or not self.timeout_s > 0
        ):
            raise ValueError(f"RewardSpec {self.name!r}: timeout_s must be > 0 or None, got {self.timeout_s!r}")


@dataclass
class ScoreResult:
    """Scores of one batch. ``failures`` includes ``timeouts``; ``failed`` is the per-item mask."""

    total: list[float]
    per_function: dict[str, list[float]]
    failures: dict[str, int]
    timeouts: dict[str, int]
    failed: dict[str, list[bool]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    not_applicable: dict[str, int] = field(default_factory=dict)
    excluded: list[bool] = field(default_factory=list)  # empty: none

    @property
    def excluded_mask(self) -> list[bool]:
        """Per item: left out of its group's statistics (advantage 0)."""
        return self.excluded or [False] * len(self.total)

    @classmethod
    def from_reward(cls, name: str, values: list[float]) -> ScoreResult:
        """The scores of one reward that cannot fail (a reward model, a length penalty)."""
        return cls(total=list(values), per_function={name: list(values)}, failures={name: 0}, timeouts={name: 0},
                   failed={name: [False] * len(values)})

    def plus(self, other: ScoreResult) -> ScoreResult:
        """Both sets of rewards on the same items: totals added, per-function records side by side."""
        return ScoreResult(total=[a + b for a, b in zip(self.total, other.total, strict=True)],
                           per_function={**self.per_function, **other.per_function},
                           failures={**self.failures, **other.failures}, timeouts={**self.timeouts, **other.timeouts},
                           failed={**self.failed, **other.failed}, errors={**self.errors, **other.errors},
                           not_applicable={**self.not_applicable, **other.not_applicable},
                           excluded=_either(self.excluded, other.excluded))

    def with_reward(self, name: str, values: list[float]) -> ScoreResult:
        """One more reward (that cannot fail) added to every item's total."""
        return self.plus(ScoreResult.from_reward(name, values))

    def slice(self, start: int, stop: int) -> ScoreResult:
        """The scores of items [start, stop). Timeouts are only counted per batch, so a slice reports
        its failures (timeouts included) and no separate timeout count."""
        failed = {k: v[start:stop] for k, v in self.failed.items()}
        return ScoreResult(total=self.total[start:stop],
                           per_function={k: v[start:stop] for k, v in self.per_function.items()},
                           failures={k: sum(v) for k, v in failed.items()}, timeouts=dict.fromkeys(failed, 0),
                           failed=failed, excluded=self.excluded[start:stop])

    @classmethod
    def concat(cls, parts: list[ScoreResult]) -> ScoreResult:
        """The scores of consecutive slices of a batch, joined (item order kept)."""
        names = list(parts[0].per_function)
        return cls(
            total=[v for part in parts for v in part.total],
            per_function={n: [v for part in parts for v in part.per_function[n]] for n in names},
            failures={n: sum(part.failures.get(n, 0) for part in parts) for n in names},
            timeouts={n: sum(part.timeouts.get(n, 0) for part in parts) for n in names},
            failed={n: [f for part in parts for f in part.failed.get(n, [False] * len(part.total))] for n in names},
            errors={n: [e for part in parts for e in part.errors.get(n, [])][:_MAX_ERROR_SAMPLES] for n in names},
            not_applicable={n: sum(part.not_applicable.get(n, 0) for part in parts) for n in names},
            excluded=([e for part in parts for e in part.excluded_mask]
                      if any(part.excluded for part in parts) else []))

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Flat scalars for logging: per-function mean and std, failure and timeout rates, total mean."""
        out: dict[str, float] = {}
        n = len(self.total)
        for name, values in self.per_function.items():
            mean = sum(values) / n if n else 0.0
            out[f"{prefix}/{name}/mean"] = mean
            # sample std, as reward/std (torch.std)
            out[f"{prefix}/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
            out[f"{prefix}/{name}/failure_rate"] = self.failures.get(name, 0) / n if n else 0.0
            out[f"{prefix}/{name}/timeout_rate"] = self.timeouts.get(name, 0) / n if n else 0.0
            if name in self.not_applicable:
                out[f"{prefix}/{name}/not_applicable_rate"] = self.not_applicable[name] / n if n else 0.0
        out[f"{prefix}/total/mean"] = sum(self.total) / n if n else 0.0
        if self.excluded:
            out[f"{prefix}/excluded_frac"] = sum(self.excluded) / n if n else 0.0
        return out


def _either(a: list[bool], b: list[bool]) -> list[bool]:
    if not a or not b:
        return list(a or b)
    return [x or y for x, y in zip(a, b, strict=True)]


NOT_APPLICABLE = "not applicable"
"""What a scoring job records for an item its function returned None for."""


def _to_score(value: Any) -> float | None:
    """A finite float, or None if ``value`` is not a usable score."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    if not isinstance(value, numbers.Real) and not hasattr(type(value), "__float__"):
        return None
    try:
        out = float(value)
    except Exception:
        return None
    return min(max(out, -MAX_ABS_SCORE), MAX_ABS_SCORE) if math.isfinite(out) else None


def _bad_value(value: Any) -> str:
    return f"returned {type(value).__name__} {repr(value)[:60]}, expected a finite float"


# A job is (spec index, item index or None for a batched call).
_Job = tuple[int, "int | None"]


class RewardScorer:
    """Scores completions with a weighted set of reward functions (see module docstring).

    Args:
        specs: the reward functions; names must be unique.
        base_dir: directory that relative ``file.py:fn`` specs are resolved against.
        isolation: ``"fork"`` (timeouts enforced in a forked child) or ``"none"``.
        grace_s: extra seconds the parent waits past a job's ``timeout_s`` before killing a
            child that did not honour the alarm.
        concurrency: forked children scoring at once (items that time out overlap).
        output_limit: bytes of the children's stdout/stderr passed on per ``score`` call.

    The object holds only plain data until :meth:`load` (called by :meth:`score`), and
    pickles without the loaded functions, so it can be constructed on the driver and used
    inside a Ray actor.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        *,
        base_dir: str | None = None,
        isolation: Literal["fork", "none"] = "fork",
        grace_s: float = 1.0,
        concurrency: int = 4,
        output_limit: int = 64 * 1024,
    ) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("RewardScorer needs at least one RewardSpec")
        for spec in specs:
            if not isinstance(spec, RewardSpec):
                raise TypeError(f"expected RewardSpec, got {type(spec).__name__}")
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate reward names: {duplicates}")
        if isolation not in ("fork", "none"):
            raise ValueError(f"isolation must be 'fork' or 'none', got {isolation!r}")
        self.specs: list[RewardSpec] = specs
        self.base_dir = base_dir
        self.isolation = isolation
        self.grace_s = float(grace_s)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = int(concurrency)
        self.output_limit = int(output_limit)
        self._fns: list[Callable[..., Any]] | None = None
        self._warned: set[str] = set()

    # ---- pickling: never ship loaded functions ----
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fns"] = None
        state["_warned"] = set()
        return state

    def load(self) -> None:
        """Resolve every spec in this process (idempotent). Raises RewardSpecError."""
        if self._fns is not None:
            return
        fns = []
        for spec in self.specs:
            try:
                fns.append(load_reward_function(spec.fn, base_dir=self.base_dir, options=spec.options))
            except RewardSpecError as exc:
                raise RewardSpecError(spec.fn, f"(reward {spec.name!r}) {exc.detail}") from exc
        # The sandbox probes for network namespaces once per process: do it here, not in
        # every short-lived scoring child.
        if any(getattr(fn, "__module__", "") == "rayrl.rewards.code_sandbox" for fn in fns):
            network_namespace_prefix()
        self._fns = fns

    # ---- scoring ----
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        fields: Sequence[Mapping[str, Any]] | None = None,
    ) -> ScoreResult:
        """Score a batch; see the module docstring for the failure and timeout policy."""
        self.load()
        assert self._fns is not None
        prompts, completions = list(prompts), list(completions)
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"got {n} prompts but {len(completions)} completions")
        rows = [dict(r) if r is not None else {} for r in fields] if fields is not None else [{} for _ in range(n)]
        if len(rows) != n:
            raise ValueError(f"got {n} prompts but {len(rows)} field rows")
        for row in rows:
            for key in _RESERVED_FIELDS:
                row.pop(key, None)

        values: list[list[float | None]] = [[None] * n for _ in self.specs]
        timed_out: list[list[bool]] = [[False] * n for _ in self.specs]
        errors: dict[str, list[str]] = {s.name: [] for s in self.specs}

        def record(job: _Job, status: str, payload: Any) -> None:
            si, item = job
            spec = self.specs[si]
            items = range(n) if item is None else (item,)
            if status == "ok":
                if item is None:
                    for i, v in zip(items, payload):
                        values[si][i] = v
                    bad = sum(v is None for v in payload)
                    if bad and len(errors[spec.name]) < _MAX_ERROR_SAMPLES:
                        errors[spec.name].append(f"{bad} item(s) of the batch were not finite numbers")
                else:
                    values[si][item] = payload
                    if payload is None and len(errors[spec.name]) < _MAX_ERROR_SAMPLES:
                        errors[spec.name].append("returned a non-number")
                return
            for i in items:
                values[si][i] = None
                timed_out[si][i] = status == "timeout"
            if len(errors[spec.name]) < _MAX_ERROR_SAMPLES:
                errors[spec.name].append(str(payload))

        inline_jobs: list[_Job] = []
        forked_jobs: list[_Job] = []
        for si, spec in enumerate(self.specs):
            jobs: list[_Job] = [(si, None)] if is_batched(self._fns[si]) else [(si, i) for i in range(n)]
            if n == 0:
                jobs = []
            in_process = spec.timeout_s is None or self.isolation == "none" or spec.fn in TRUSTED_BUILTINS
            (inline_jobs if in_process else forked_jobs).extend(jobs)

        runner = _JobRunner(self._fns, self.specs, prompts, completions, rows)
        for job in inline_jobs:
            record(job, *runner.run(job, timeout_s=None, inline=True))
        if forked_jobs:
            lock = threading.Lock()

            def locked_record(job: _Job, status: str, payload: Any) -> None:
                with lock:
                    record(job, status, payload)

            shards = [forked_jobs[k::self.concurrency] for k in range(min(self.concurrency, len(forked_jobs)))]
            output = _CappedOutput(self.output_limit)
            if len(shards) == 1:
                self._run_forked(runner, shards[0], locked_record, output)
            else:
                with ThreadPoolExecutor(len(shards), thread_name_prefix="rayrl-reward") as pool:
                    for done in [pool.submit(self._run_forked, runner, shard, locked_record, output)
                                 for shard in shards]:
                        done.result()
            output.flush_note()

        per_function: dict[str, list[float]] = {}
        failed: dict[str, list[bool]] = {}
        failures: dict[str, int] = {}
        timeouts: dict[str, int] = {}
        not_applicable: dict[str, int] = {}
        excluded = [False] * n
        total = [0.0] * n
        for si, spec in enumerate(self.specs):
            missing = [v is None or v == NOT_APPLICABLE for v in values[si]]
            scores = [spec.fallback if m else v for v, m in zip(values[si], missing)]
            mask = [v is None for v in values[si]]
            per_function[spec.name] = scores
            failed[spec.name] = mask
            failures[spec.name] = sum(mask)
            timeouts[spec.name] = sum(timed_out[si])
            not_applicable[spec.name] = sum(missing) - sum(mask)
            if spec.on_failure == "exclude":
                excluded = [e or m for e, m in zip(excluded, missing)]
            for i, s in enumerate(scores):
                total[i] += spec.weight * s
            if failures[spec.name]:
                log = logger.debug if spec.name in self._warned else logger.warning
                self._warned.add(spec.name)
                log("reward %r: %d/%d items fell back to %s (%d timeouts); e.g. %s", spec.name,
                    failures[spec.name], n, spec.fallback, timeouts[spec.name],
                    (errors[spec.name] or ["?"])[0])
        return ScoreResult(total=total, per_function=per_function, failures=failures, timeouts=timeouts,
                           failed=failed, errors={k: v for k, v in errors.items() if v},
                           not_applicable=not_applicable,
                           excluded=excluded if any(spec.on_failure == "exclude" for spec in self.specs) else [])

    def _run_forked(self, runner: "_JobRunner", jobs: list[_Job], record: Callable[[_Job, str, Any], None],
                    output: "_CappedOutput") -> None:
        ctx = multiprocessing.get_context("fork")
        start = 0
        while start < len(jobs):
            reader, writer = ctx.Pipe(duplex=False)
            out_r, out_w = os.pipe()
            proc = ctx.Process(target=_child_main, args=(runner, jobs, start, writer, out_w), daemon=False,
                               name="rayrl-reward-scorer")
            proc.start()
            writer.close()
            os.close(out_w)
            drain = threading.Thread(target=output.drain, args=(out_r,), daemon=True, name="rayrl-reward-output")
            drain.start()
            current = start
            last_progress = time.monotonic()
            try:
                while current < len(jobs):
                    spec = self.specs[jobs[current][0]]
                    budget = float(spec.timeout_s or 0.0) + self.grace_s
                    remaining = last_progress + budget - time.monotonic()
                    if remaining <= 0:
                        record(jobs[current], "timeout",
                               f"timed out after {spec.timeout_s:g}s (child did not respond; killed)")
                        current += 1
                        break
                    ready = multiprocessing.connection.wait([reader, proc.sentinel], timeout=remaining)
                    if reader in ready:
                        try:
                            k, status, payload = reader.recv()
                        except (EOFError, OSError):
                            ready = [proc.sentinel]
                        else:
                            record(jobs[k], status, payload)
                            current = k + 1
                            last_progress = time.monotonic()
                            continue
                    if proc.sentinel in ready:
                        # Child gone: drain what it managed to send, then blame the job in flight.
                        while reader.poll(0):
                            try:
                                k, status, payload = reader.recv()
                            except (EOFError, OSError):
                                break
                            record(jobs[k], status, payload)
                            current = k + 1
                        if current < len(jobs):
                            proc.join(0.1)
                            record(jobs[current], "error",
                                   f"scoring process died (exit code {proc.exitcode}) in this function")
                            current += 1
                        break
            finally:
                if current >= len(jobs):
                    proc.join(1.0)  # finished normally: let it exit on its own
                stray = _descendants(proc.pid)  # before the child dies: orphans lose their parent link
                killed = proc.is_alive()
                if killed:
                    proc.kill()
                proc.join(5)
                kill_process_group(proc.pid)  # processes a reward function started (timed out or not)
                for pid in stray:  # ...also those that left the group (setsid, start_new_session)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                reader.close()
                drain.join(1.0)
            if killed or proc.exitcode not in (0, None):
                # A killed child cannot clean up after a sandbox run it was in the middle of.
                cleanup_stale_sandbox_dirs()
            start = current


class _JobRunner:
    """Calls one job's function; shared by the in-process path and the forked child."""

    def __init__(self, fns, specs, prompts, completions, rows):
        self.fns, self.specs = fns, specs
        self.prompts, self.completions, self.rows = prompts, completions, rows

    def _call(self, job: _Job) -> tuple[str, Any]:
        si, item = job
        fn = self.fns[si]
        if item is None:
            keys: dict[str, None] = {}
            for row in self.rows:
                keys.update(dict.fromkeys(row))
            lists = {k: [row.get(k) for row in self.rows] for k in keys}
            out = fn(self.prompts, self.completions, **lists)
            n = len(self.prompts)
            if isinstance(out, (str, bytes, Mapping)):
                return "error", f"batched function returned {type(out).__name__}, expected a list of {n} floats"
            try:
                out = list(out)
            except TypeError:
                return "error", f"batched function returned {type(out).__name__}, expected a list of {n} floats"
            if len(out) != n:
                return "error", f"batched function returned {len(out)} scores for {n} items"
            return "ok", [NOT_APPLICABLE if v is None else _to_score(v) for v in out]
        out = fn(self.prompts[item], self.completions[item], **self.rows[item])
        if out is None:
            return "ok", NOT_APPLICABLE
        score = _to_score(out)
        if score is None:
            return "error", _bad_value(out)
        return "ok", score

    def run(self, job: _Job, timeout_s: float | None, *, inline: bool = False) -> tuple[str, Any]:
        """(status, payload): ("ok", score or list), ("error", message) or ("timeout", message).

        In-process (``inline``) a KeyboardInterrupt still propagates; everything else is caught.
        """
        try:
            try:
                if timeout_s is not None:
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                return self._call(job)
            finally:
                if timeout_s is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except RewardTimeout:
            return "timeout", f"timed out after {timeout_s:g}s"
        except KeyboardInterrupt:
            if inline:
                raise
            return "error", "KeyboardInterrupt"
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            return "error", f"{type(exc).__name__}: {str(exc)[:300]}"


def _raise_timeout(signum, frame):
    raise RewardTimeout()


def _child_main(runner: _JobRunner, jobs: list[_Job], start: int, conn, output_fd: int) -> None:
    """Body of the forked scoring child: run jobs[start:], one alarm each, stream results."""
    try:
        os.setsid()  # its own process group: whatever a reward function spawns ends with the child
    except OSError:
        pass
    # stdout/stderr into the parent's capped drain (not straight into the worker's log).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or odd stream: nothing to flush
            pass
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    try:
        signal.signal(signal.SIGALRM, _raise_timeout)
        use_alarm = True
    except (ValueError, OSError):  # not the main thread: the parent's watchdog still applies
        use_alarm = False
    for k in range(start, len(jobs)):
        si = jobs[k][0]
        timeout = runner.specs[si].timeout_s if use_alarm else None
        status, payload = runner.run(jobs[k], timeout)
        try:
            conn.send((k, status, payload))
        except Exception as exc:  # unpicklable payload cannot happen (floats/str); a dead parent can
            if isinstance(exc, (BrokenPipeError, EOFError)):
                return
            conn.send((k, "error", f"could not report result: {exc}"))
    for pid in _descendants(os.getpid()):  # what the functions started and left running, setsid or not
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    conn.close()


class _CappedOutput:
    """Drains the scoring children's stdout/stderr pipes; passes on the first ``limit`` bytes of a
    ``score`` call (to this process's stderr), counts and drops the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.passed = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def drain(self, fd: int) -> None:
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self._lock:
                    keep = chunk[: max(0, self.limit - self.passed)]
                    self.passed += len(keep)
                    self.dropped += len(chunk) - len(keep)
                if keep:
                    try:
                        os.write(2, keep)
                    except OSError:
                        pass
        finally:
            os.close(fd)

    def flush_note(self) -> None:
        if self.dropped:
            logger.warning("reward functions printed %d bytes more than the %d passed on; dropped",
                           self.dropped, self.limit)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from ``/proc``'s parent links; [] where there is no /proc)."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    children: dict[int, list[int]] = {}
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found
