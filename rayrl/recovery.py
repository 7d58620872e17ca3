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

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
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

    def __len__(self) -> int:
        return len(self.actors)

    # ---- failures ------------------------------------------------------------------------------
    def replace(self, index: int, failure: Exception) -> None:
        """End actor ``index`` (dead or stuck) and start a new one in its place (again if the new one
        fails to start or to catch up); raise ``failure`` instead once the role has used its
        ``fault.max_restarts``."""
        while True:
            if self.restarts >= self.max_restarts:
                raise type(failure)(f"{failure}\n{self.role} has been restarted {self.restarts} times in this run "
                                    f"(fault.max_restarts: {self.max_restarts}); stopping",
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

    def _start_in_place(self, index: int) -> None:
        """A new actor at ``index``, identified and brought up to date (``after_restart``)."""
        self.actors[index] = self.start_actor(index)
        self.who[index] = ActorIdentity(self.role, index)
        (fresh,) = identify(self.role, [self.actors[index]], self.startup_s)
        self.who[index] = ActorIdentity(self.role, index, fresh.pid, fresh.node_ip)
        for hook in self.after_restart:
            hook(index)
        _log.warning("%s started", self.who[index].describe())

    def resize(self, count: int) -> None:
        """Grow to ``count`` actors (new ones are brought up to date by the ``after_restart`` hooks
        before they take work) or shrink by ending the last ones. Call between calls: nothing of the
        ended actors may be in flight. A new actor that fails to start is ended and the pool kept as
        it is (the error is raised)."""
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

    def recover(self, failure: Exception) -> bool:
        """If ``failure`` (a ``RoleFailed`` / ``RemoteCallTimeout`` from :func:`rayrl.remote.gather`)
        names actors of this role, replace them and return True (the caller retries its call)."""
        mine = [who.index for who in getattr(failure, "who", ()) if who.role == self.role]
        for index in sorted(set(mine)):
            self.replace(index, failure)
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
        import ray  # slow: ray
        from ray.exceptions import GetTimeoutError, RayActorError

        queue = deque(range(len(calls)))
        results: list[Any] = [None] * len(calls)
        pending: dict[Any, tuple[int, int, float]] = {}  # ref -> (call, actor, due time)
        busy: set[int] = set()

        def fail(index: int, actor: int, failure: Exception) -> None:
            busy.discard(actor)
            self.replace(actor, failure)
            self.reissued += 1
            queue.appendleft(index)

        while queue or pending:
            for index in list(queue):
                pinned = calls[index].actor
                free = [a for a in range(len(self.actors)) if a not in busy and (pinned is None or a == pinned)]
                if not free:
                    continue
                queue.remove(index)
                busy.add(free[0])
                pending[calls[index].submit(self.actors[free[0]])] = (index, free[0],
                                                                     time.monotonic() + calls[index].deadline_s)
            first_due = min(due for _, _, due in pending.values())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, first_due - time.monotonic()))
            if not done:
                now = time.monotonic()
                for ref, (index, actor, due) in list(pending.items()):
                    if due <= now:
                        del pending[ref]
                        call = calls[index]
                        fail(index, actor, RemoteCallTimeout(
                            timeout_message([self.who[actor]], call.doing, call.deadline_s, self.setting),
                            who=[self.who[actor]]))
                continue
            index, actor, _ = pending.pop(done[0])
            try:
                results[index] = ray.get(done[0], timeout=READY_GET_S)
            except (RayActorError, GetTimeoutError, ActorUnusable) as error:
                fail(index, actor, RoleFailed(f"{self.who[actor].describe()} died while {calls[index].doing}: "
                                              f"{first_line(error)}", who=[self.who[actor]]))
                continue
            busy.discard(actor)
        return results

    def call_all(self, submit: Callable[[Any], Any], doing: str, deadline_s: float) -> list:
        """``submit`` on every actor (pinned), each re-issued on a replacement if its actor fails."""
        return self.map([Call(submit, deadline_s, doing, actor=i) for i in range(len(self.actors))])

    def metrics(self) -> dict[str, float]:
        return {f"faults/{self.role}/restarts": float(self.restarts),
                f"faults/{self.role}/reissued": float(self.reissued)}
