"""Run model-written Python against tests in a sandboxed subprocess (the ``python_tests`` reward).

:func:`run_python_sandboxed` runs ``code`` and then each test (a string of Python, usually
asserts) in ONE child interpreter and returns a :class:`SandboxResult`:
``status`` (``"ok"``, ``"error"``, ``"timeout"``, ``"memory"``), ``passed``/``total`` test counts
and the tails of stdout/stderr. The ``python_tests`` reward wraps it and returns
``passed / total`` (a single test string is 1.0 or 0.0).

Test forms (see :func:`normalize_tests`):

* **Python test strings** (asserts, or any code that raises on failure). A test whose only
  statement is an expression, e.g. ``"add(1, 2) == 3"``, is run as ``assert (add(1, 2) == 3)``:
  run bare it would "pass" whatever its value. (So ``"print(f(1))"`` fails: ``None`` is falsy.)
  An empty test or a bare literal (``"True"``, ``"[...]"``) fails.
* **stdin/stdout cases** (APPS/TACO ``{"inputs": [...], "outputs": [...]}``, code_contests
  ``{"input": [...], "output": [...]}``, or a list of ``{"input", "output"}`` dicts; as objects
  or a JSON string): the program runs as ``__main__`` in its own child per case, with the input
  on stdin and ``timeout_s`` per case; a case passes when the program exits with code 0
  (``sys.exit(0)``/``exit()`` included) and its stdout equals the expected output up to
  trailing whitespace on each line and at the end. The first case that times out ends the run
  (later cases count as failed).
* **Call-based cases** (APPS/TACO ``{"fn_name", "inputs", "outputs"}``): run as one assert per
  case, calling the function (or ``Solution().fn``) with the case's arguments.
* Anything else (a string decoding to another literal, mixed lists, ...) raises ValueError:
  it must not score 1.0 by running a harmless expression.

The child program is :mod:`rayrl.rewards.sandbox_child` (``sandbox_child.py`` next to this
module; standard library only, nothing from ``rayrl``), run by path (:data:`SANDBOX_CHILD_PATH`)
as ``python -I -B [-S] sandbox_child.py <payload fd> <result fd>``. This module is the parent
side: it writes the payload (to an unlinked file whose fd the child reads), starts and watches the
child, reads its result pipe and, for stdin/stdout and call-based tests, judges the outputs.

**Isolation** (``isolation=``): ``"strict"`` (the default) runs the child inside the bubblewrap
sandbox of :mod:`rayrl.rewards.isolation`: an unprivileged uid, fresh user/PID/network/IPC/mount
namespaces, a read-only view of the runtime only, private size-capped tmpfs work dir and
``/dev/shm``, no capabilities, a seccomp filter. That is the security boundary, and it holds
against native code (``ctypes``, crafted bytecode). ``"guard"`` leaves out that layer: what
follows is then all there is, and it is NOT a boundary against deliberately malicious code.

**The verdict.** For stdin/stdout cases the scorer compares the program's stdout (the expected
output never enters the child); for call-based cases (:class:`CallCase`) the child sends back
only each returned value, as JSON, and the scorer compares it (an object whose ``__eq__`` is
always true does not survive JSON). For assert-style tests the asserts run in the child next to
the model's code, which can therefore forge their outcome: monkeypatch what they use, compare
equal to anything, read the tests through frame introspection, or, as native code, read the
nonce from memory and write a pass line. The sandbox bounds what such code can do to the host,
not what it can do to its own verdict.

Layers inside the sandbox (and all there is with ``isolation="guard"``), from the outside in:

* **Process**: ``python -I -B`` (isolated mode: no ``PYTHON*`` variables, no user site, no
  script directory on ``sys.path``; no ``.pyc`` writes), ``start_new_session=True`` so the
  child leads its own process group, ``close_fds`` (only stdout/stderr files and one result
  pipe are passed), stdin is ``/dev/null`` (the case's input for stdin/stdout tests).
* **Environment**: a minimal ``env`` (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = the work dir,
  single-threaded BLAS): nothing is inherited, so ``WANDB_API_KEY``, ``HF_TOKEN``, cloud
  credentials and Ray's variables are not visible.
* **Files**: a fresh temp dir per run (``rayrl-sandbox-*``); with ``guard`` its ``work/`` subdir is
  the cwd and the only place the child may write (with ``strict``, the sandbox's tmpfs ``/sandbox``); stdout/stderr go to files next to it (not inside it) and
  the whole temp dir is removed afterwards (if the owner itself is SIGKILLed, a later run or
  :func:`cleanup_stale_sandbox_dirs` removes it).
* **Resource limits** set by the child program before any model code runs: ``RLIMIT_AS``
  (``memory_mb``, default 512), ``RLIMIT_CPU`` (``ceil(timeout_s) + 1`` s), ``RLIMIT_NOFILE``
  (64), ``RLIMIT_FSIZE`` (``max_file_mb``, default 16; ``SIGXFSZ`` is ignored so a big write
  fails with ``EFBIG``), ``RLIMIT_CORE`` 0, and ``RLIMIT_NPROC`` when the sandbox has its own uid
  (strict, rayrl run as root). (They are set inside the child rather than in a
  ``preexec_fn``: ``preexec_fn`` can deadlock when the parent has threads, and a Ray actor
  always has threads. The effect is the same: they are in force before model code runs.)
* **Wall clock**: the parent waits at most ``timeout_s`` (default 5 s) and then SIGKILLs the
  whole process group (``os.killpg``), and always kills the group once the run is over, so no
  process is left behind. A watchdog thread inside the child also exits it at
  ``timeout_s + 1`` s or as soon as its parent dies (so a killed scorer leaves no orphan).
* **Network**: a prelude replaces ``socket.socket`` (by a subclass that refuses to construct
  anything but an ``AF_UNIX`` socket, so ``socket.socketpair`` and asyncio still work),
  ``socket.create_connection``, ``socket.getaddrinfo``, ``socket.gethostbyname``... and the
  audit hook below refuses every ``socket.*`` event except creating an ``AF_UNIX`` socket, so
  ``connect``/``bind``/``sendto`` to any address (TCP, UDP, Unix paths such as the Ray or
  Docker sockets) fail, also through ``_socket`` used directly. Additionally, when
  ``network="auto"`` and ``unshare --net`` (as root) or ``unshare --user --map-root-user
  --net`` works on this machine, the child runs in an empty network namespace (no interfaces
  but a down loopback), which also stops native code.
* **Audit hook** (``sys.addaudithook``, cannot be removed from Python) raising
  ``PermissionError`` on: ``open`` for writing (mode ``w``/``a``/``x``/``+`` or write/create/
  truncate flags) outside the work dir; opening a directory outside it (closes the ``dir_fd``
  route); ``os.remove/rmdir/rename/mkdir/chmod/chown/utime/truncate/setxattr/removexattr`` and
  ``shutil.*`` outside it, also through a file descriptor (``os.fchmod(fd)``, ``os.fchown``,
  ``os.utime(fd)``, ``os.ftruncate``: the fd's file, read from ``/proc/self/fd``, must be in the
  work dir); any ``os.symlink``/``os.link``; any ``subprocess.Popen``,
  ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.fork``/``forkpty``; ``os.kill``/
  ``killpg`` of another process; ``resource.setrlimit``/``prlimit``; ``sqlite3`` outside the
  work dir; ``syslog``/``readline`` history writes; reading another process's
  ``/proc/<pid>/...`` (e.g. the parent's ``environ``) or any process's ``mem``, checked on both
  the lexical (``normpath``) and the resolved (``realpath``) path, so ``/proc/self/../PID``,
  ``/proc//PID``, ``/proc/self/root/proc/PID``, a ``chdir`` into ``/proc`` or a ``dir_fd`` do not
  get around it; ``/dev/mem``-like devices; ``sys.settrace``/``setprofile``, ``sys.monitoring``
  and ``gc.get_objects/get_referrers/get_referents``; assigning ``__code__`` to the guard's own
  functions (other functions may get a new ``__code__``: ``types.coroutine`` does, for asyncio); loading a native extension module from
  outside the interpreter's own ``sys.path`` directories (e.g. a ``.so`` written into the work
  dir); ``ctypes`` loading a library or resolving/calling a symbol,
  ``string_at``/``from_address`` (importing ``ctypes`` itself works, so numpy does; ``ctypes.memmove``
  and ``memset`` raise no audit event, so native memory access is possible: strict isolation is
  what holds then); fresh
  imports of ``_xxsubinterpreters`` (a subinterpreter would not carry the hook) and the
  ``_test*`` C modules. Writes to ``/dev/null`` are allowed. ``_posixsubprocess.fork_exec``,
  ``os.mkfifo`` and ``os.mknod`` have no audit event and are replaced by refusing stubs
  (re-importing ``_posixsubprocess`` to get the original is refused). The hook's path checks
  use only C functions (``lstat``/``readlink``/``stat``) on exact ``str`` copies and its
  functions have private builtins, so monkeypatching ``builtins``, ``os``/``posixpath`` or
  passing a ``str`` subclass does not change its verdicts.
* **Result channel**: the child reports ``<nonce> <result>`` lines on a pipe; the parent ignores
  lines without the nonce (a fresh random one per run). The nonce reaches the child in the
  payload file, which is deleted before model code runs, and then lives only in the constants
  of a small second audit hook (the "reporter"): no variable, frame local or attribute holds
  it, and the policy hook refuses ``frame.f_code``/``function.__code__`` reads that would reach
  the reporter's code object (as well as ``gc`` walks, trace/profile functions and assigning
  any ``__code__``), deciding with names no reachable function shares. The reporter
  writes a result line only when ``sys.audit`` is called from the child's runner frame
  (frame identity, which Python code cannot forge), and the runner binds the builtins it needs
  before model code runs. The pipe is moved off the fd number given in ``argv`` and ``argv`` is
  cut to the child program's path; model code can still write to the pipe, but without the
  nonce such lines count for nothing.

Known limits of the Python-level guard (damage control for buggy or reward-hacking model code,
NOT a security boundary against deliberately malicious code: model code shares the interpreter
with the harness; with ``isolation="strict"`` the OS layer bounds what getting past it gains):

* Audit hooks only see what CPython reports. Native code (a C extension already importable,
  hand-made bytecode via ``types.CodeType``/``marshal``, which the stdlib itself needs) can
  bypass them and could, e.g., read the nonce from the process's memory (see "The verdict").
* Model code runs in the same interpreter as the tests: it can read the test code through
  frame introspection (``sys._getframe(1).f_locals``; blocking ``sys._getframe`` would break
  ``collections.namedtuple``, ``typing`` and ``logging``), monkeypatch builtins or modules that
  the tests use, or return objects whose ``__eq__`` is always true. Prefer stdin/stdout tests
  (the expected output never enters the child) when that matters.
* Model code that catches a frame of the policy hook (e.g. in a signal handler) can reach its
  helper functions and rewrite their closure cells (``cell_contents`` has no audit event),
  e.g. to allow writes elsewhere. This does not open the result channel.
* On Python >= 3.13, ``frame.f_locals`` is writable (PEP 667): code that reaches the runner's
  frame could rebind its locals, which weakens the runner's protection.
* Reads are not restricted beyond the ``/proc`` rules above (imports need them):
  world-readable files can be read.
* Without a network namespace, native code could still open sockets; with it, filesystem
  Unix sockets outside are only blocked by the audit hook.
* Processes are bounded by the hook (no fork/exec from Python). ``RLIMIT_NPROC`` (per uid) is
  set only where the sandbox has a uid of its own: strict isolation under root (uid 65534). A
  non-root run has no process count limit (the limit would count the user's other processes);
  native code can fork until its CPU and memory limits or the wall clock end it, inside its PID
  namespace. Without strict isolation a native fork that calls ``setsid`` could escape ``killpg``.
* A test string that loops forever costs the whole run's remaining tests (one child, one
  wall clock): passes reported before the timeout still count.
* As root, native code could raise its own rlimits (``CAP_SYS_RESOURCE``); disk use is bounded
  per file (``RLIMIT_FSIZE``) but not in file count.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, Literal, Sequence

from rayrl.rewards.isolation import (
    HARNESS_PATH,
    ISOLATION_MODES,
    WORK_DIR,
    Isolation,
    check_strict_isolation,
    seccomp_program,
    strict_command,
)

__all__ = [
    "SANDBOX_CHILD_PATH",
    "CallCase",
    "SandboxResult",
    "StdioCase",
    "cleanup_stale_sandbox_dirs",
    "extract_python_code",
    "make_python_tests",
    "network_namespace_prefix",
    "normalize_tests",
    "python_tests",
    "run_python_sandboxed",
    "score_python_tests",
]

SandboxStatus = Literal["ok", "error", "timeout", "memory"]


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    status: ``"ok"`` the code ran and every test was executed (some may have failed);
        ``"error"`` the code itself failed (syntax error, exception at top level, abnormal
        exit) before the tests could run; ``"timeout"`` the wall clock or CPU limit was hit;
        ``"memory"`` a ``MemoryError`` (the ``RLIMIT_AS`` limit) was seen.
    passed/total: tests that completed without an exception / tests given. Passes reported
        before a timeout or crash still count.
    error: a one-line reason for the first failure (exception of the code or first failed
        test), or None.
    """

    status: SandboxStatus
    passed: int
    total: int
    stdout_tail: str = ""
    stderr_tail: str = ""
    error: str | None = None
    returncode: int | None = None
    duration_s: float = 0.0
    violations: tuple[str, ...] = ()

    @property
    def score(self) -> float:
        """Fraction of tests passed (0.0 when there are no tests)."""
        return self.passed / self.total if self.total else 0.0


# --------------------------------------------------------------------------------------
# Network namespace probe
# --------------------------------------------------------------------------------------
_NETNS_PREFIX: list[str] | None = None
_NETNS_PROBED = False


def network_namespace_prefix() -> list[str] | None:
    """Command prefix that runs a program in an empty network namespace, or None.

    Probed once per process: ``unshare --net`` (needs ``CAP_SYS_ADMIN``, e.g. root) then
    ``unshare --user --map-root-user --net`` (unprivileged user namespaces). Both can be
    unavailable (containers without the capability, hardened kernels): the in-process
    prelude and audit hook are then the only network guard.
    """
    global _NETNS_PREFIX, _NETNS_PROBED
    if _NETNS_PROBED:
        return _NETNS_PREFIX
    _NETNS_PROBED = True
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return None
    true = shutil.which("true") or "/bin/true"
    for prefix in ([exe, "--net", "--"], [exe, "--user", "--map-root-user", "--net", "--"]):
        try:
            done = subprocess.run(prefix + [true], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=5, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            _NETNS_PREFIX = prefix
            return prefix
    return None


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------
# The child program, run by path (never imported here: it installs audit hooks and limits on
# the interpreter that runs it). Public so that a test can run a modified copy.
SANDBOX_CHILD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


def _child_env(work: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": work,
        "TMPDIR": work,
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }


def _tail(path: str, limit: int, raw: bool = False) -> Any:
    """The last ``limit`` bytes of a file, decoded (or as bytes with ``raw``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        data = b""
    return data if raw else data.decode("utf-8", "replace")


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):  # model code may have chmod-ed things read-only
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").rsplit("[", 1)[-1].rstrip("]")
    except OSError:
        return "0"


_DIR_RE = re.compile(r"^rayrl-sandbox-(\d+)-(\d+)-")
_SWEEP_EVERY_S = 300.0
_last_sweep = 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_sandbox_dirs(tmp_dir: str | None = None) -> int:
    """Remove sandbox temp dirs whose owning process is dead; returns how many were removed.

    A run removes its own dir in a ``finally``; only a SIGKILLed owner (e.g. a scoring child
    killed by :class:`~rayrl.rewards.scoring.RewardScorer`'s watchdog) leaves one behind. Dir
    names carry the owner's pid and pid-namespace id, so a /tmp shared between containers is
    safe: only dirs of dead processes of this pid namespace are touched.
    """
    global _last_sweep
    _last_sweep = time.monotonic()
    tmp_dir = tmp_dir or tempfile.gettempdir()
    ns, removed = _pid_namespace(), 0
    try:
        names = os.listdir(tmp_dir)
    except OSError:
        return 0
    for name in names:
        m = _DIR_RE.match(name)
        if m is None or m.group(1) != ns or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        _rmtree(os.path.join(tmp_dir, name))
        removed += not os.path.exists(os.path.join(tmp_dir, name))
    return removed


def kill_process_group(pgid: int) -> None:
    """SIGKILL every process in group ``pgid`` (nothing if it is empty)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class StdioCase:
    """One stdin/stdout test case: the program reads ``input`` and must print ``output``."""

    input: str
    output: str


@dataclass(frozen=True)
class CallCase:
    """One call-based case (APPS/TACO ``fn_name``): call ``fn_name(*args)`` (a top-level function,
    or a method of ``Solution()`` as LeetCode-style solutions define it) and compare the value it
    returns with ``expected``. The comparison happens in the scorer, never in the model's process:
    the child only sends back the returned value as JSON."""

    fn_name: str
    args: tuple[Any, ...]
    expected: Any

    def matches(self, returned_json: str) -> bool:
        """Whether the returned value (JSON from the child) equals ``expected``. Tuples and lists
        are the same (JSON has no tuples), and APPS's habit of wrapping each output in a
        one-element list is accepted."""
        try:
            got = json.loads(returned_json)
        except ValueError:
            return False
        want = _plain(self.expected)
        return got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _normalize_output(text: str) -> str:
    """Trailing whitespace of each line and trailing blank lines do not count."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()


def _as_tests(tests: Any) -> list[str] | list[StdioCase] | list[CallCase]:
    """``tests`` as a list of test strings, :class:`StdioCase` or :class:`CallCase` (mixing is an
    error)."""
    if tests is None:
        return []
    if isinstance(tests, str):
        return [tests]
    if isinstance(tests, dict) or (isinstance(tests, (list, tuple)) and tests and isinstance(tests[0], dict)):
        return _stdio_cases(tests)
    items = list(tests)
    if all(isinstance(t, str) for t in items):
        return items
    if all(isinstance(t, StdioCase) for t in items) or all(isinstance(t, CallCase) for t in items):
        return items
    raise ValueError("tests must be test strings, StdioCase or CallCase objects (not mixed), got "
                     + ", ".join(sorted({type(t).__name__ for t in items})))


def run_python_sandboxed(
    code: str,
    tests: str | Sequence[str] | Sequence[StdioCase] | dict | None = None,
    *,
    timeout_s: float = 5.0,
    memory_mb: int | None = 512,
    max_file_mb: int = 16,
    network: Literal["auto", "prelude"] = "auto",
    isolation: Isolation = "strict",
    site_packages: bool = True,
    output_limit: int = 2000,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` then ``tests`` in a sandboxed child interpreter (see module docstring).

    Args:
        code: the program (module-level code, executed with ``__name__ == "__solution__"``;
            ``"__main__"`` for stdin/stdout tests).
        tests: one test string (``total == 1``), a list of them (each run separately, in a
            copy of the program's namespace, all inside the same child), stdin/stdout cases
            (a list of :class:`StdioCase`, ``{"inputs": [...], "outputs": [...]}`` or a list of
            ``{"input", "output"}`` dicts: one child per case, see :func:`python_tests`), or
            None (``total == 0``: just run the code). A test string that is a single
            expression (``"add(1, 2) == 3"``) is run as ``assert (...)``; a bare literal or an
            empty test fails.
        timeout_s: wall-clock limit for the whole child (startup, code and all tests); for
            stdin/stdout cases, for each case.
        memory_mb: ``RLIMIT_AS`` in MiB (None: unlimited).
        max_file_mb: ``RLIMIT_FSIZE`` in MiB (also bounds stdout/stderr).
        network: with ``isolation="guard"``: ``"auto"`` adds an empty network namespace when
            ``unshare`` works here; ``"prelude"`` relies on the in-process guards only. (Strict
            isolation always has an empty network namespace.)
        isolation: ``"strict"`` (default) runs the child in the bubblewrap sandbox of
            :mod:`rayrl.rewards.isolation`, a security boundary against native code, and raises
            :class:`~rayrl.rewards.isolation.IsolationUnavailable` where this machine cannot
            create it; ``"guard"`` runs it under the Python-level guard only (damage control
            for buggy or reward-hacking code, NOT a boundary against malicious code).
        site_packages: keep the interpreter's site-packages importable (``-S`` otherwise).
        output_limit: characters of stdout/stderr tail to keep.
        python: interpreter (default ``sys.executable``).

    Never raises for anything the code does; raises only for invalid arguments or when the
    child cannot be started at all (OSError).
    """
    test_list = _as_tests(tests)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if network not in ("auto", "prelude"):
        raise ValueError(f"network must be 'auto' or 'prelude', got {network!r}")
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    kwargs = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_file_mb=max_file_mb, network=network,
                  isolation=isolation, site_packages=site_packages, output_limit=output_limit, python=python)
    if test_list and isinstance(test_list[0], StdioCase):
        return _run_stdio_cases(str(code), test_list, **kwargs)
    if test_list and isinstance(test_list[0], CallCase):
        return _run_child(str(code), [], calls=test_list, **kwargs)[0]
    return _run_child(str(code), test_list, **kwargs)[0]


def _run_stdio_cases(code: str, cases: list[StdioCase], **kwargs: Any) -> SandboxResult:
    """One child per case, the input on stdin; a case passes when the program exits with code 0
    and its stdout matches (see :func:`_normalize_output`). The first case that times out ends
    the run (the rest count as failed), so a program that hangs costs one timeout, not one per
    case. Status: ``"ok"`` when every case that ran exited cleanly (answers may be wrong), else
    the status of the first one that did not."""
    passed, duration, violations = 0, 0.0, []
    error: str | None = None
    shown = unclean = None
    for i, case in enumerate(cases):
        result, stdout = _run_child(code, [], stdin_text=case.input, **kwargs)
        duration += result.duration_s
        violations += [v for v in result.violations if v not in violations]
        # rc 0 without the harness's "done" (status "error") is a program ending in os._exit(0).
        clean = result.returncode == 0 and result.status in ("ok", "error")
        if clean and _normalize_output(stdout.decode("utf-8", "replace")) == _normalize_output(case.output):
            passed += 1
            continue
        if error is None:
            error, shown = f"case {i}: " + ("wrong answer" if clean else (result.error or result.status)), result
        if not clean and unclean is None:
            unclean = result
        if result.status == "timeout":
            if i + 1 < len(cases):
                error += f"; not run after the timeout of case {i}: {len(cases) - i - 1} case(s)"
            break
    shown = shown or result
    status: SandboxStatus = "ok" if unclean is None else ("error" if unclean.status == "ok" else unclean.status)
    return SandboxResult(status=status, passed=passed, total=len(cases), stdout_tail=shown.stdout_tail,
                         stderr_tail=shown.stderr_tail, error=error, returncode=shown.returncode,
                         duration_s=duration, violations=tuple(violations[:20]))


def _run_child(
    code: str,
    test_list: list[str],
    *,
    calls: Sequence[CallCase] = (),
    stdin_text: str | None = None,
    timeout_s: float,
    memory_mb: int | None,
    max_file_mb: int,
    network: str,
    isolation: Isolation,
    site_packages: bool,
    output_limit: int,
    python: str | None,
) -> tuple[SandboxResult, bytes]:
    """One sandboxed child: ``code`` then ``test_list`` (or ``calls``, judged here from the
    values the child returns; or, with ``stdin_text``, the program as ``__main__`` reading it on
    stdin). Returns the result and, in stdin mode, all of stdout (bounded by ``RLIMIT_FSIZE``)."""
    if time.monotonic() - _last_sweep > _SWEEP_EVERY_S:
        cleanup_stale_sandbox_dirs()
    strict = isolation == "strict"
    python = python or sys.executable
    if strict:
        check_strict_isolation(python)
    nonce = secrets.token_hex(16)
    root = _make_run_dir(stdin_text, host_work=not strict)
    work = WORK_DIR if strict else os.path.join(root, "work")
    payload = {"code": code, "tests": test_list, "calls": [[c.fn_name, list(c.args)] for c in calls],
               "nonce": nonce, "work": work, "mode": "tests" if stdin_text is None else "stdio",
               "memory_bytes": int(memory_mb * 1024 * 1024) if memory_mb else 0,
               "cpu_s": int(math.ceil(timeout_s)) + 1, "fsize_bytes": int(max_file_mb * 1024 * 1024),
               "wall_s": float(timeout_s),
               # The process limit counts every process of the uid: only the sandbox's own uid.
               "nproc": _SANDBOX_NPROC if strict and os.geteuid() == 0 else 0}
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    # The child's lifeline: this process holds the only write end, so the child sees EOF (and exits)
    # when this process is gone, even SIGKILLed (bwrap's monitors do not die with their parent).
    lifeline_r, lifeline_w = os.pipe()
    payload["lifeline_fd"] = lifeline_r
    t0 = time.monotonic()
    try:
        with _unlinked_file(json.dumps(payload).encode("utf-8")) as payload_file, \
                _unlinked_file(seccomp_program() if strict else b"") as seccomp_file:
            flags = ["-I", "-B"] + ([] if site_packages else ["-S"])
            if strict:
                command = strict_command(
                    [*flags, HARNESS_PATH, str(payload_file.fileno())], python=python,
                    harness=SANDBOX_CHILD_PATH, env=_child_env(WORK_DIR),
                    work_bytes=max(64, 4 * max_file_mb) << 20, shm_bytes=max(16, max_file_mb) << 20,
                    seccomp_fd=seccomp_file.fileno())
                argv, extra_fds = command.argv, (payload_file.fileno(), lifeline_r, *command.pass_fds)
            else:
                argv = [python, *flags, SANDBOX_CHILD_PATH, str(payload_file.fileno())]
                prefix = network_namespace_prefix() if network == "auto" else None
                argv, extra_fds = (prefix or []) + argv, (payload_file.fileno(), lifeline_r)
            child = _supervise_child(argv, root, extra_fds=extra_fds, work=work, strict=strict,
                                     with_stdin=stdin_text is not None, deadline=t0 + timeout_s)
    finally:
        os.close(lifeline_r)
        os.close(lifeline_w)
        stdout_tail = _tail(out_path, output_limit)
        stderr_tail = _tail(err_path, output_limit)
        stdout_all = _tail(out_path, (max_file_mb << 20) + 1, raw=True) if stdin_text is not None else b""
        _rmtree(root)
    duration = time.monotonic() - t0

    total = len(calls) or len(test_list)
    report = _ChildReport.parse(child.output, nonce, total=total)
    report.judge_calls(calls)
    status, error = _status_and_error(report, child, timeout_s, stderr_tail)
    return SandboxResult(status=status, passed=len(report.passed_ids), total=total,
                         stdout_tail=stdout_tail, stderr_tail=stderr_tail, error=error,
                         returncode=child.returncode, duration_s=duration,
                         violations=tuple(report.violations)), stdout_all


# Processes (threads included) uid 65534 may have at once, all strict sandboxes of the node
# together: room for many concurrent children, not for a fork bomb.
_SANDBOX_NPROC = 512


@contextlib.contextmanager
def _unlinked_file(data: bytes) -> Iterator[IO[bytes]]:
    """A temp file holding ``data``, already unlinked (only its fd reaches the child), at 0."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        yield f


def _make_run_dir(stdin_text: str | None, *, host_work: bool) -> str:
    """A fresh temp dir for one child: its stdout/stderr files, in stdin mode its input, and with
    ``host_work`` (guard isolation) ``work/``, its cwd and the only place it may write (strict
    isolation has a tmpfs of its own instead); returns its path. The dir name carries the pid
    namespace and pid for :func:`cleanup_stale_sandbox_dirs`."""
    root = tempfile.mkdtemp(prefix=f"rayrl-sandbox-{_pid_namespace()}-{os.getpid()}-")
    if host_work:
        os.mkdir(os.path.join(root, "work"), 0o700)
    if stdin_text is not None:
        # Outside work/: the program reads it only as its stdin.
        with open(os.path.join(root, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin_text)
    return root


@dataclass(frozen=True)
class _ChildExit:
    """How one child ended: its exit code, the raw bytes of its result pipe, whether the wall
    clock ran out, and the CPU seconds it used (0.0 when unknown)."""

    returncode: int | None
    output: bytes
    killed: bool
    cpu_used: float


def _supervise_child(argv: list[str], root: str, *, extra_fds: Sequence[int], work: str, strict: bool,
                     with_stdin: bool, deadline: float) -> _ChildExit:
    """Start the child (the result pipe's fd as its last argument), read its result pipe until
    EOF or ``deadline``, then SIGKILL its process group and reap it. The group is killed and
    the pipe closed whatever happens, so nothing is left behind. (Under strict isolation the
    group is bwrap's: the sandbox's PID namespace, and everything in it, dies with it.)"""
    r_fd, w_fd = os.pipe()
    proc = None
    try:
        proc = _start_child(argv + [str(w_fd)], root, (w_fd, *extra_fds), work=work, strict=strict,
                            with_stdin=with_stdin)
        fd, w_fd = w_fd, -1
        os.close(fd)  # only the child holds the write end: EOF when it (and its heirs) are gone
        output, killed = _read_result_pipe(r_fd, proc, deadline)
        if not killed:
            _await_exit(proc.pid, min(1.0, max(0.0, deadline - time.monotonic())))
        kill_process_group(proc.pid)
        cpu_used = _reap(proc)
        returncode = proc.returncode
        if strict and returncode is not None and returncode > 128:
            returncode = -(returncode - 128)  # bwrap reports a child killed by signal N as 128 + N
        return _ChildExit(returncode, output, killed, cpu_used)
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        os.close(r_fd)
        if proc is not None and proc.returncode is None:
            kill_process_group(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _await_exit(pid: int, seconds: float) -> None:
    """Wait up to ``seconds`` for ``pid`` to exit, without reaping it (so its exit status and CPU
    use are still there for :func:`_reap`): the result pipe reaches EOF when the interpreter
    exits, a moment before bwrap, its parent, reports how it ended."""
    end = time.monotonic() + seconds
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:
            return
        if time.monotonic() >= end:
            return
        time.sleep(0.002)


def _start_child(argv: list[str], root: str, fds: Sequence[int], *, work: str, strict: bool,
                 with_stdin: bool) -> subprocess.Popen:
    """Popen the child, stdout/stderr to files in ``root``, stdin from ``root``/stdin (or
    ``/dev/null``), passing only ``fds`` (the result pipe, the payload, the seccomp program)."""
    stdin_f = open(os.path.join(root, "stdin"), "rb") if with_stdin else subprocess.DEVNULL
    try:
        with open(os.path.join(root, "stdout"), "wb") as out_f, open(os.path.join(root, "stderr"), "wb") as err_f:
            # A minimal env (nothing inherited) and its own session: the whole process
            # group is SIGKILLed on timeout and after every run.
            return subprocess.Popen(argv, stdin=stdin_f, stdout=out_f, stderr=err_f,
                                    cwd=root if strict else work,
                                    env={"PATH": "/usr/bin:/bin"} if strict else _child_env(work),
                                    close_fds=True, pass_fds=tuple(fds), start_new_session=True)
    finally:
        if with_stdin:
            stdin_f.close()


def _read_result_pipe(r_fd: int, proc: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
    """What the child wrote on the result pipe, and whether ``deadline`` passed before EOF."""
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return buf, True
        ready, _, _ = select.select([r_fd], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(r_fd, 65536)
            buf += chunk
            if len(buf) > 1 << 20:  # a flood on the result pipe: stop listening
                buf = buf[-(1 << 16):]
            if not chunk:
                return buf, False
        elif proc.poll() is not None:
            # Child gone but pipe still open (a stray descendant): stop waiting.
            return buf, False


def _reap(proc: subprocess.Popen) -> float:
    """Wait for the (killed) child, setting ``proc.returncode``; returns the CPU seconds it
    used, 0.0 when unknown (someone else reaped it)."""
    try:
        _, wstatus, rusage = os.wait4(proc.pid, 0)
    except ChildProcessError:
        proc.wait()
        return 0.0
    proc.returncode = os.waitstatus_to_exitcode(wstatus)
    return rusage.ru_utime + rusage.ru_stime


@dataclass
class _ChildReport:
    """The result lines the child reported with this run's nonce (see :mod:`sandbox_child`):
    ``S`` started, ``D`` done, ``V <event>`` a refused operation, ``E``/``M <error>`` the code
    raised (``M``: MemoryError), ``T <i> <1|0> <F|M> <error>`` test ``i`` passed or failed."""

    started: bool = False
    done: bool = False
    mem_seen: bool = False
    solution_error: str | None = None
    passed_ids: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    returned: dict[int, str] = field(default_factory=dict)  # call-based: case -> returned value (JSON)

    @classmethod
    def parse(cls, output: bytes, nonce: str, total: int) -> _ChildReport:
        """Lines without the nonce (anyone could have written them) count for nothing."""
        report = cls()
        for raw in output.decode("utf-8", "replace").splitlines():
            if raw.startswith(nonce + " "):
                report._add(raw[len(nonce) + 1 :].split(" ", 4), total)
        return report

    def _add(self, parts: list[str], total: int) -> None:
        kind = parts[0]
        if kind == "S":
            self.started = True
        elif kind == "D":
            self.done = True
        elif kind == "V" and len(parts) > 1:
            self.violations.append(parts[1])
        elif kind in ("E", "M"):
            self.solution_error = " ".join(parts[1:])
            self.mem_seen = self.mem_seen or kind == "M"
        elif kind == "R" and len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) < total:
            self.returned.setdefault(int(parts[1]), " ".join(parts[2:]))
        elif kind == "T" and len(parts) >= 3 and parts[1].isdigit():
            i = int(parts[1])
            if parts[2] == "1" and i < total:
                self.passed_ids.add(i)
            else:
                if len(parts) > 3 and parts[3] == "M":
                    self.mem_seen = True
                self.failed.setdefault(i, " ".join(parts[4:5]))


    def judge_calls(self, calls: Sequence[CallCase]) -> None:
        """Call-based cases pass here, in the scorer, when the value returned matches (and only
        so: a pass line claimed by the child counts for nothing in this mode)."""
        if not calls:
            return
        self.passed_ids = set()
        for i, returned in self.returned.items():
            if calls[i].matches(returned):
                self.passed_ids.add(i)
            else:
                self.failed.setdefault(i, f"returned {returned[:200]}")


def _status_and_error(report: _ChildReport, child: _ChildExit, timeout_s: float,
                      stderr_tail: str) -> tuple[SandboxStatus, str | None]:
    """The run's status and one-line reason, from what the child reported and how it ended."""
    rc = child.returncode
    error = report.solution_error
    if error is None and report.failed:
        first = min(report.failed)
        error = f"test {first} failed: {report.failed[first]}"
    if child.killed or rc == 124:
        return "timeout", error or f"timed out after {timeout_s:g}s"
    if report.mem_seen:
        return "memory", error
    if report.done:
        return "ok", error
    if rc is not None and rc < 0 and -rc == signal.SIGXCPU:
        return "timeout", error or "CPU time limit exceeded"
    if rc is not None and rc < 0 and -rc == signal.SIGKILL:
        # Not our kill: the CPU hard limit or the kernel OOM killer.
        if child.cpu_used >= math.ceil(timeout_s) + 0.5:
            return "timeout", error or "CPU time limit exceeded"
        return "memory", error or "killed (out of memory?)"
    if "MemoryError" in stderr_tail or "Cannot allocate memory" in stderr_tail:
        return "memory", error or "out of memory"
    if error is None:
        error = "exited early with code %s" % rc if report.started else f"sandbox failed to start (code {rc})"
    return "error", error


# --------------------------------------------------------------------------------------
# The python_tests reward
# --------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_python_code(completion: str) -> str:
    """The LAST ```python (or ```py/```python3) fenced block, else the last untagged fenced
    block, else the whole completion. An unterminated final fence (truncated generation) runs
    to the end of the text."""
    completion = str(completion)
    tagged, untagged = [], []
    for m in _FENCE.finditer(completion):
        lang = m.group(1).lower()
        if lang in ("python", "py", "python3"):
            tagged.append(m.group(2))
        elif lang == "":
            untagged.append(m.group(2))
    if tagged:
        return tagged[-1]
    if untagged:
        return untagged[-1]
    return completion


def _io_text(value: Any, what: str) -> str:
    """An input/output value: a string, or a list of lines (APPS stores some that way)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"python_tests: a stdin/stdout {what} must be a string or a list of lines, "
                     f"got {type(value).__name__}")


def _stdio_cases(tests: Any) -> list[StdioCase]:
    """``{"inputs": [...], "outputs": [...]}`` (APPS/TACO) or ``[{"input", "output"}, ...]``."""
    if isinstance(tests, dict):
        for ik, ok in (("inputs", "outputs"), ("input", "output")):
            ins, outs = tests.get(ik), tests.get(ok)
            if isinstance(ins, (list, tuple)) and isinstance(outs, (list, tuple)):
                # Parallel lists, one case per element: APPS/TACO "inputs"/"outputs", and
                # code_contests' {"input": [...], "output": [...]} (a column of structs).
                if len(ins) != len(outs) or not ins:
                    raise ValueError(f"python_tests: '{ik}' and '{ok}' must be non-empty lists of the same length")
                return [StdioCase(_io_text(i, "input"), _io_text(o, "output")) for i, o in zip(ins, outs)]
        tests = [tests]
    if isinstance(tests, (list, tuple)) and all(isinstance(t, dict) for t in tests):
        cases = []
        for t in tests:
            if "input" not in t or "output" not in t:
                raise ValueError(f"python_tests: a stdin/stdout case needs 'input' and 'output', got keys {sorted(t)}")
            cases.append(StdioCase(_io_text(t["input"], "input"), _io_text(t["output"], "output")))
        return cases
    raise ValueError(f"python_tests: cannot interpret tests of type {type(tests).__name__}")


def _call_based_tests(tests: dict) -> list[CallCase]:
    """APPS/TACO call-based tests, ``{"fn_name": f, "inputs": [[args...], ...], "outputs": [out, ...]}``,
    as :class:`CallCase` objects (the returned values are compared in the scorer)."""
    name, ins, outs = tests.get("fn_name"), tests.get("inputs"), tests.get("outputs")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"python_tests: 'fn_name' must be a Python identifier, got {name!r}")
    if not isinstance(ins, (list, tuple)) or not isinstance(outs, (list, tuple)) or len(ins) != len(outs) or not ins:
        raise ValueError("python_tests: call-based tests need non-empty 'inputs' and 'outputs' lists of the same length")
    return [CallCase(name, tuple(args) if isinstance(args, (list, tuple)) else (args,), expected)
            for args, expected in zip(ins, outs)]


_NOT_DECODED = object()


def normalize_tests(tests: Any) -> str | list[str] | list[StdioCase] | list[CallCase]:
    """Tests from a dataset field: a test string, a list of them, or stdin/stdout cases.

    * a string of Python (usually asserts) or a list of such strings;
    * stdin/stdout cases: ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO ``input_output``)
      or a list of ``{"input": ..., "output": ...}`` dicts, as objects or as a JSON string;
    * call-based ``{"fn_name", "inputs", "outputs"}`` (APPS/TACO), as :class:`CallCase` objects;
    * a string holding a JSON (or Python-literal) list of strings is decoded: executed as-is it
      would be a bare list expression.

    Raises ValueError for a missing or empty field and for anything else that is not tests
    (a string that decodes to some other literal...): such a row
    must fail loudly rather than "pass" by running a harmless expression.
    """
    if isinstance(tests, str):
        stripped = tests.strip()
        if not stripped:
            raise ValueError("python_tests needs a non-empty 'tests' field")
        if stripped[0] not in "[{":
            return tests
        decoded: Any = _NOT_DECODED
        try:
            decoded = json.loads(stripped)
        except ValueError:
            try:  # e.g. str() of a dict: "{'inputs': [...], 'outputs': [...]}"
                decoded = ast.literal_eval(stripped)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return tests  # Python code that merely starts with a bracket
        if isinstance(decoded, list) and decoded and all(isinstance(t, str) for t in decoded):
            return decoded
        if isinstance(decoded, dict) and "fn_name" in decoded:
            return _call_based_tests(decoded)
        if isinstance(decoded, (dict, list)) and decoded:
            return _stdio_cases(decoded)
        raise ValueError(f"python_tests: 'tests' decodes to a {type(decoded).__name__} literal, not to tests")
    if tests is None or isinstance(tests, (bytes, StdioCase)):
        raise ValueError("python_tests needs a non-empty 'tests' field (a str, a list of str or stdin/stdout cases)")
    if isinstance(tests, dict):
        return _call_based_tests(tests) if "fn_name" in tests else _stdio_cases(tests)
    try:
        items = list(tests)
    except TypeError:
        raise ValueError(
            f"python_tests: 'tests' must be a str, a list of str or stdin/stdout cases, got {type(tests).__name__}"
        ) from None
    if not items:
        raise ValueError("python_tests needs a non-empty 'tests' field")
    if all(isinstance(t, str) for t in items):
        return items
    if all(isinstance(t, StdioCase) for t in items):
        return items
    if all(isinstance(t, dict) for t in items):
        return _stdio_cases(items)
    raise ValueError("python_tests: 'tests' must be all strings or all stdin/stdout cases, got "
                     + ", ".join(sorted({type(t).__name__ for t in items})))


def score_python_tests(
    completion: str, tests: str | Sequence[str] | Any, **sandbox_kwargs: Any
) -> tuple[float, SandboxResult]:
    """(score, SandboxResult) for a completion against ``tests`` (see :func:`python_tests`)."""
    result = run_python_sandboxed(extract_python_code(completion), normalize_tests(tests), **sandbox_kwargs)
    return result.score, result


def make_python_tests(
    *, timeout_s: float = 5.0, memory_mb: int | None = 512, isolation: Isolation = "strict", **sandbox_kwargs: Any
) -> Callable[..., float]:
    """Factory: a ``python_tests`` reward with custom sandbox limits (the keys of a reward's
    ``options``: ``timeout_s``, ``memory_mb``, ``isolation``, ``max_file_mb``, ...).

    With ``isolation="strict"`` (the default) it checks at once that this machine can create the
    sandbox, and raises :class:`~rayrl.rewards.isolation.IsolationUnavailable` saying what to
    change if not, so a run fails before it starts rather than scoring every completion 0.

    The returned function also records its last :class:`SandboxResult` on
    ``fn.last_result`` (per process), for callers that want the failure reason.
    """
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    if isolation == "strict":
        check_strict_isolation(sandbox_kwargs.get("python"))
    return _python_tests_reward(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation, **sandbox_kwargs)


def _python_tests_reward(**sandbox_kwargs: Any) -> Callable[..., float]:
    def python_tests(prompt: str, completion: str, tests: Any = None, **fields: Any) -> float:
        """Fraction of the row's ``tests`` passed by the completion's code, run sandboxed.

        ``tests``: assert strings (a bare expression such as ``"f(1) == 2"`` is asserted),
        stdin/stdout or call-based cases (see the module docstring and :func:`normalize_tests`)."""
        score, result = score_python_tests(completion, tests, **sandbox_kwargs)
        python_tests.last_result = result
        return score

    python_tests.last_result = None
    return python_tests


# The default instance (strict isolation) checks the machine on its first call, not at import.
python_tests = _python_tests_reward(timeout_s=5.0, memory_mb=512, isolation="strict")
