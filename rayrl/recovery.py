"""Stateless roles that survive their actors: a rollout worker, verifier, reward-model or reference
actor that dies or stops answering is killed, started again and handed the work it had in flight.

``RestartingActors`` holds one role's actors. Its :meth:`~RestartingActors.map` runs a list of
calls (``Call``) on them, each on whichever actor is free (or on a pinned one), every call with its own
deadline. When an actor dies (``RayActorError``), says it cannot serve any more (``ActorUnusable``:
its engine died) or misses a deadline, it is ended, a new actor takes its index (the
``after_restart`` hooks then bring it up to date, e.g. the current policy weights), and the call is
issued again; each call's result lands in its own slot, so a re-issued call is neither lost nor
counted twice. Any other exception raised by the method itself is not a failure of the actor and
propagates unchanged (a restart would not fix it).

Restarts are bounded per role by ``fault.max_restarts`` over the whole run; past it the run stops
with the error of the last failure. ``restarts`` and ``reissued`` are counted for the step metrics
(``faults/<role>/restarts``, ``faults/<role>/reissued``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from rayrl.remote import ActorIdentity, ActorUnusable, RemoteCallTimeout, RoleFailed, first_line, identify, timeout_message

_log = logging.getLogger(__name__)

T = TypeVar("T")

READY_GET_S = 60.0  # taking a finished call's result (only a lost object store entry takes long)


@dataclass(frozen=True)
class Call:
    """One remote call: ``submit(actor)`` starts it and returns its ObjectRef."""

    submit: Callable[[Any], Any]
    deadline_s: float
    doing: str  # for errors and logs: "generating (prompts 8...)"
    actor: int | None = None  # pinned to this actor index; None: whichever actor is free


class RestartingActors:
    """The actors of one stateless role, by index. ``actors`` and ``who`` are updated in place when an
    actor is replaced, so holders of these lists (the weight pusher) always see the live ones."""

    def __init__(self, role: str, start_actor: Callable[[int], Any], count: int, *, max_restarts: int,
                 startup_s: float, setting: str):
        """``start_actor(i)`` creates the actor for index ``i`` (the first time and after a failure);
        ``setting`` names the ``fault.timeouts`` key of the role's calls, for timeout errors."""
        self.role = role
        self.start_actor = start_actor
        self.max_restarts = max_restarts
        self.startup_s = startup_s
        self.setting = setting
        self.actors = [start_actor(i) for i in range(count)]
        self.who = identify(role, self.actors, startup_s) if self.actors else []
        self.restarts = 0
        self.reissued = 0
        self.after_restart: list[Callable[[int], None]] = []
        # The async rollout scheduler's thread and the loop's thread may both see an actor fail.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.actors)

    # ---- failures ------------------------------------------------------------------------------
    def replace(self, index: int, failure: Exception, *, handle: Any = None, pid: int | None = None) -> None:
        """End actor ``index`` (dead or stuck) and start a new one in its place (again if the new one
        fails to start or to catch up); raise ``failure`` instead once the role has used its
        ``fault.max_restarts``. ``handle`` / ``pid``: the failed actor as the caller knew it; if another
        caller has replaced it meanwhile, nothing happens."""
        with self._lock:
            if (handle is not None and self.actors[index] is not handle) or \
                    (pid is not None and self.who[index].pid not in (None, pid)):
                return
            while True:
                if self.restarts >= self.max_restarts:
                    raise type(failure)(f"{failure}\n{self.role} has been restarted {self.restarts} times in this "
                                        f"run (fault.max_restarts: {self.max_restarts}); stopping",
                                        who=getattr(failure, "who", ())) from failure
                self.restarts += 1
                _log.warning("%s failed; restarting it (%d of fault.max_restarts=%d): %s", self.who[index].describe(),
                             self.restarts, self.max_restarts, str(failure).splitlines()[0])
                self._end(index)
                try:
                    self._start_in_place(index)
                    return
                except (RoleFailed, RemoteCallTimeout) as again:
                    failure = again

    def _end(self, index: int) -> None:
        import ray  # slow: ray

        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception as error:  # noqa: BLE001 - already gone is what we want
            _log.debug("ending %s: %r", self.who[index].describe(), error)

    def _start_in_place(self, index: int, catch_up: bool = True) -> None:
        """A new actor at ``index``, identified and brought up to date (``after_restart``, unless not
        ``catch_up``)."""
        self.actors[index] = self.start_actor(index)
        self.who[index] = ActorIdentity(self.role, index)
        (fresh,) = identify(self.role, [self.actors[index]], self.startup_s)
        self.who[index] = ActorIdentity(self.role, index, fresh.pid, fresh.node_ip)
        for hook in self.after_restart if catch_up else ():
            hook(index)
        _log.warning("%s started", self.who[index].describe())

    def start_all_again(self) -> None:
        """End every actor and start a fresh one at each index, without the ``after_restart`` hooks (the
        caller brings them up to date) and without counting restarts: for actors that went down with
        another role (colocated rollout workers in a failed trainer group's bundles)."""
        with self._lock:
            for index in range(len(self.actors)):
                self._end(index)
            for index in range(len(self.actors)):
                self._start_in_place(index, catch_up=False)

    def resize(self, count: int) -> None:
        """Grow to ``count`` actors (new ones are brought up to date by the ``after_restart`` hooks
        before they take work) or shrink by ending the last ones. Call between calls: nothing of the
        ended actors may be in flight. A new actor that fails to start is ended and the pool kept as
        it is (the error is raised)."""
        with self._lock:
            self._resize(count)

    def _resize(self, count: int) -> None:
        while len(self.actors) > count:
            self._end(len(self.actors) - 1)
            self.actors.pop()
            _log.warning("%s removed (the pool now has %d)", self.who.pop().describe(), len(self.actors))
        while len(self.actors) < count:
            index = len(self.actors)
            self.actors.append(None)
            self.who.append(ActorIdentity(self.role, index))
            try:
                self._start_in_place(index)
            except BaseException:
                self._end(index)
                self.actors.pop()
                self.who.pop()
                raise

    @contextlib.contextmanager
    def settled(self) -> Iterator[None]:
        """No actor of this role is being replaced inside this block (another thread's replacement
        finishes first), so calls submitted here reach actors that are up and current."""
        with self._lock:
            yield

    def recover(self, failure: Exception) -> bool:
        """If ``failure`` (a ``RoleFailed`` / ``RemoteCallTimeout`` from :func:`rayrl.remote.gather`)
        names actors of this role, replace them and return True (the caller retries its call)."""
        mine = {who.index: who.pid for who in getattr(failure, "who", ()) if who.role == self.role}
        for index in sorted(mine):
            self.replace(index, failure, pid=mine[index])
        return bool(mine)

    def retry(self, operation: Callable[[], T]) -> T:
        """``operation()`` (calls on all of this role's actors, e.g. a weight push), run again after
        replacing the actors it names as failed."""
        while True:
            try:
                return operation()
            except (RoleFailed, RemoteCallTimeout) as failure:
                if not self.recover(failure):
                    raise
                self.reissued += 1

    # ---- calls ---------------------------------------------------------------------------------
    def map(self, calls: Sequence[Call]) -> list:
        """Every call's result, in ``calls`` order. One call at a time per actor; a call whose actor
        dies or misses its deadline is re-issued on the replacement."""
        stream = CallStream(self)
        for index, call in enumerate(calls):
            stream.add(call, index)
        results: list[Any] = [None] * len(calls)
        while stream.unfinished:
            for index, result in stream.wait():
                results[index] = result
        return results

    def call_all(self, submit: Callable[[Any], Any], doing: str, deadline_s: float) -> list:
        """``submit`` on every actor (pinned), each re-issued on a replacement if its actor fails."""
        return self.map([Call(submit, deadline_s, doing, actor=i) for i in range(len(self.actors))])

    def metrics(self) -> dict[str, float]:
        return {f"faults/{self.role}/restarts": float(self.restarts),
                f"faults/{self.role}/reissued": float(self.reissued)}


class CallStream:
    """Calls on one role's actors that a caller keeps adding (``map`` for a caller that does not know
    all its calls up front: the asynchronous rollout scheduler). Each queued call starts on the first
    free actor (or its pinned one), one call at a time per actor, and its result is handed back from
    :meth:`wait` as soon as it is there, with the caller's tag. A call whose actor dies, says it is
    unusable or misses the call's deadline is re-queued (first in line) after the actor is replaced.

    Cost per call is constant, whatever the number of calls running: each call's ``ObjectRef.future()``
    reports to one inbox when it is done (a wait reads only what finished), and the deadlines sit in a
    heap. At 256 engines a step's chunks made a wait over every running call's future quadratic."""

    def __init__(self, actors: RestartingActors):
        self.actors = actors
        self.queue: deque[tuple[Call, Any]] = deque()
        # ref -> (call, tag, actor, handle, due, sequence number)
        self.pending: dict[Any, tuple[Call, Any, int, Any, float, int]] = {}
        self.busy: set[int] = set()
        self._inbox: deque[Any] = deque()  # refs of finished calls, appended on Ray's threads
        self._arrived = threading.Event()  # something reached the inbox, or a wake future is done
        self._deadlines: list[tuple[float, int, Any]] = []  # heap of (due, sequence, ref); finished ones skipped
        self._sequence = itertools.count()
        self._hooked: set[Future] = set()  # wake futures that set _arrived when done

    @property
    def unfinished(self) -> int:
        """Calls queued or running."""
        return len(self.queue) + len(self.pending)

    def add(self, call: Call, tag: Any) -> None:
        self.queue.append((call, tag))

    def dispatch(self) -> None:
        """Start queued calls, in order, on the free actors they may run on."""
        if not self.queue or len(self.busy) >= len(self.actors.actors):
            return
        free = [a for a in range(len(self.actors.actors)) if a not in self.busy]
        waiting: deque[tuple[Call, Any]] = deque()
        while self.queue and free:
            call, tag = self.queue.popleft()
            if call.actor is None:
                actor = free.pop(0)
            elif call.actor in free:
                actor = call.actor
                free.remove(actor)
            else:
                waiting.append((call, tag))
                continue
            self._start(call, tag, actor)
        waiting.extend(self.queue)
        self.queue = waiting

    def _start(self, call: Call, tag: Any, actor: int) -> None:
        handle = self.actors.actors[actor]
        self.busy.add(actor)
        ref = call.submit(handle)
        due, sequence = time.monotonic() + call.deadline_s, next(self._sequence)
        self.pending[ref] = (call, tag, actor, handle, due, sequence)
        heapq.heappush(self._deadlines, (due, sequence, ref))
        ref.future().add_done_callback(lambda _done, ref=ref: self._report(ref))

    def _report(self, ref: Any) -> None:
        self._inbox.append(ref)
        self._arrived.set()

    def wait(self, timeout: float | None = None, *, dispatch: bool = True,
             wake: Sequence[Future] = ()) -> list[tuple[Any, Any]]:
        """Start what can start (unless ``dispatch`` is False), then return ``(tag, result)`` for every
        call finished within ``timeout`` seconds (None: until one finishes or fails, or one of the
        ``wake`` futures is done). A failed call is re-queued and returns nothing yet."""
        import ray  # slow: ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if dispatch:
            self.dispatch()
        if not self.pending and not wake:
            return []
        self._hooked = {future for future in self._hooked if not future.done()}
        for future in wake:
            if future not in self._hooked:
                self._hooked.add(future)
                future.add_done_callback(lambda _done: self._arrived.set())
        limit = self._earliest_due() - time.monotonic()
        if timeout is not None:
            limit = min(limit, timeout)
        if not self._inbox and not any(future.done() for future in wake):
            self._arrived.clear()
            # checked again after the clear: a report or wake-up in between is not lost
            if not self._inbox and not any(future.done() for future in wake):
                self._arrived.wait(None if math.isinf(limit) else max(0.0, limit))
        arrived = []
        while self._inbox:
            arrived.append(self._inbox.popleft())
        # in the order they were started (a call that timed out and was forgotten may still report)
        ready = sorted((self.pending[ref][5], ref) for ref in arrived if ref in self.pending)
        if not ready:
            self._fail_overdue()
            return []
        finished = []
        for _, ref in ready:
            call, tag, actor, handle, _, _ = self.pending.pop(ref)
            try:
                result = ray.get(ref, timeout=READY_GET_S)
            except (RayActorError, GetTimeoutError, ActorUnusable) as error:
                self._fail(call, tag, actor, handle, RoleFailed(
                    f"{self.actors.who[actor].describe()} died while {call.doing}: {first_line(error)}",
                    who=[self.actors.who[actor]]))
                continue
            self.busy.discard(actor)
            finished.append((tag, result))
        if dispatch:
            self.dispatch()
        return finished

    def _earliest_due(self) -> float:
        while self._deadlines and self._deadlines[0][2] not in self.pending:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else math.inf

    def _fail_overdue(self) -> None:
        now = time.monotonic()
        while self._earliest_due() <= now:
            _, _, ref = heapq.heappop(self._deadlines)
            call, tag, actor, handle, _, _ = self.pending.pop(ref)
            self._fail(call, tag, actor, handle, RemoteCallTimeout(
                timeout_message([self.actors.who[actor]], call.doing, call.deadline_s, self.actors.setting),
                who=[self.actors.who[actor]]))

    def _fail(self, call: Call, tag: Any, actor: int, handle: Any, failure: Exception) -> None:
        self.busy.discard(actor)
        self.actors.replace(actor, failure, handle=handle)
        self.actors.reissued += 1
        self.queue.appendleft((call, tag))
