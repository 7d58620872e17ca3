"""Waiting on actors with a deadline. Every remote call of a run names its role and what it is doing;
one that does not answer in time, or whose actor dies, is an error that says which actor (role, index,
pid, node), what it was doing, which ``fault.timeouts`` key bounds it and, for a stuck actor on this
node, its Python stack (taken with py-spy, which comes with ``ray[default]``).

Nothing here waits without a deadline: :func:`gather` is the only way the driver takes results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ActorIdentity", "ActorUnusable", "RemoteCallTimeout", "RoleFailed", "first_line", "gather", "identify", "python_stack", "timeout_message"]

STACK_LINES = 60  # of a stuck actor's Python stack, in the error


@dataclass(frozen=True)
class ActorIdentity:
    """Who an actor is, for error messages: its role, its index in the role, its pid and node."""

    role: str
    index: int
    pid: int | None = None
    node_ip: str | None = None

    def describe(self) -> str:
        where = f"pid {self.pid} on {self.node_ip}" if self.pid is not None else "pid unknown"
        return f"{self.role}[{self.index}] ({where})"


class _ActorFailure:
    """``who``: the actors that failed (a stateless role replaces them, see ``rayrl.recovery``)."""

    def __init__(self, message: str, who: Sequence[ActorIdentity] = ()):
        super().__init__(message)
        self.who = list(who)

    def __reduce__(self):  # keep ``who`` across pickling (Ray ships exceptions between processes)
        return (type(self), (str(self), self.who))


class RemoteCallTimeout(_ActorFailure, TimeoutError):
    """An actor did not answer within its deadline (the message names it and where it is stuck)."""


class RoleFailed(_ActorFailure, RuntimeError):
    """An actor died during a remote call (the message names it and what it was doing)."""


class ActorUnusable(RuntimeError):
    """Raised by an actor's method when the actor can no longer serve (e.g. its inference engine died
    under it): the caller treats it as the actor's death and replaces it."""


def _whoami(_instance: Any) -> tuple[int, str]:
    """Run inside an actor (through ``__ray_call__``): its pid and node address."""
    import ray  # slow: ray (the CLI imports this module for its exception types)

    return os.getpid(), ray.util.get_node_ip_address()


def identify(role: str, actors: Sequence[Any], deadline_s: float) -> list[ActorIdentity]:
    """Ask each of ``actors`` (freshly started: they answer at once) for its pid and node."""
    refs = [actor.__ray_call__.remote(_whoami) for actor in actors]
    unknown = [ActorIdentity(role, i) for i in range(len(actors))]
    answers = gather(refs, who=unknown, doing="starting up", deadline_s=deadline_s, setting="fault.timeouts.startup_s")
    return [ActorIdentity(role, i, pid, ip) for i, (pid, ip) in enumerate(answers)]


def gather(refs: Sequence[Any], *, who: Sequence[ActorIdentity], doing: str, deadline_s: float,
           setting: str) -> list:
    """The results of ``refs`` (``refs[i]`` a call to the actor ``who[i]``), all within ``deadline_s``.

    Raises :class:`RemoteCallTimeout` naming the actors that did not answer (with the Python stack of
    the first, where it runs on this node) and ``setting``, the key that sets the deadline; or
    :class:`RoleFailed` when an actor died. An exception raised by the actor's method propagates as
    Ray raises it (the original type, with the actor's traceback).

    Results are taken as they arrive: the first death or error is raised at once, not after the other
    calls finish (a rank whose peer died may wait in a collective that never completes)."""
    import time

    import ray  # slow: ray (the CLI imports this module for its exception types)
    from ray.exceptions import GetTimeoutError, RayActorError

    refs = list(refs)
    position = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    due = time.monotonic() + deadline_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, due - time.monotonic()))
        if not ready:
            waiting = set(pending)
            stuck = [who[i] for i, ref in enumerate(refs) if ref in waiting]
            raise RemoteCallTimeout(timeout_message(stuck, doing, deadline_s, setting), who=stuck)
        index = position[ready[0]]
        actor = who[index]
        try:
            results[index] = ray.get(ready[0], timeout=deadline_s)
        except (RayActorError, ActorUnusable) as error:
            raise RoleFailed(f"{actor.describe()} died while {doing}: {first_line(error)}", who=[actor]) from error
        except GetTimeoutError as error:  # ready a moment ago: only a lost object store entry gets here
            raise RemoteCallTimeout(timeout_message([actor], doing, deadline_s, setting), who=[actor]) from error
        except Exception:
            # A method error may be a peer's death seen from a collective ("connection closed"): if one
            # of the other actors of this call died, that is the failure to report.
            _raise_if_one_died(pending, {ref: who[position[ref]] for ref in pending}, doing)
            raise
    return results


DEATH_GRACE_S = 5.0  # how long a method error waits for the call's other actors to show a death


def _raise_if_one_died(pending: list, who: dict, doing: str) -> None:
    import ray  # slow: ray
    from ray.exceptions import RayActorError

    if not pending:
        return
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_GRACE_S)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except RayActorError as error:
            raise RoleFailed(f"{who[ref].describe()} died while {doing}: {first_line(error)}",
                             who=[who[ref]]) from error
        except Exception:  # noqa: BLE001 - another method error: the first one is reported
            continue


def timeout_message(stuck: Sequence[ActorIdentity], doing: str, deadline_s: float, setting: str) -> str:
    """What :class:`RemoteCallTimeout` says: who, while doing what, which setting, and where it is stuck."""
    names = ", ".join(actor.describe() for actor in stuck)
    message = (f"{names} did not answer within {deadline_s:g} s while {doing} ({setting} sets this deadline; "
               "raise it if the work is just slow)")
    first = stuck[0]
    if first.pid is not None:
        stack = python_stack(first)
        message += f"\n{first.describe()} is at:\n{stack}"
    return message


def python_stack(actor: ActorIdentity) -> str:
    """The Python stack of ``actor``'s process (py-spy), when it runs on this node; else how to get it."""
    import ray  # slow: ray (the CLI imports this module for its exception types)

    if actor.node_ip != ray.util.get_node_ip_address():
        return f"  (on another node: run `py-spy dump --pid {actor.pid}` on {actor.node_ip}, or `ray stack` there)"
    if _stopped(actor.pid):
        return f"  (pid {actor.pid} is stopped (SIGSTOP or a debugger): it cannot run)"
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    try:
        done = subprocess.run([spy, "dump", "--pid", str(actor.pid)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"  (py-spy could not run: {error})"
    text = (done.stdout or done.stderr).strip().splitlines()
    if done.returncode != 0 or not text:
        return f"  (py-spy dump --pid {actor.pid} failed: {' '.join(text)[:300] or done.returncode})"
    shown = text[:STACK_LINES] + ([f"  ... {len(text) - STACK_LINES} more lines"] if len(text) > STACK_LINES else [])
    return "\n".join("  " + line for line in shown)


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def first_line(error: BaseException) -> str:
    """An error's first line (at most 300 characters), for one-line reports; for an error Ray raises
    on behalf of an actor's method, the method's own error (not Ray's header)."""
    cause = getattr(error, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
