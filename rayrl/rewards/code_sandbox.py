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

Layers of isolation, from the outside in:

* **Process**: ``python -I -B`` (isolated mode: no ``PYTHON*`` variables, no user site, no
  script directory on ``sys.path``; no ``.pyc`` writes), ``start_new_session=True`` so the
  child leads its own process group, ``close_fds`` (only stdout/stderr files and one result
  pipe are passed), stdin is ``/dev/null`` (the case's input for stdin/stdout tests).
* **Environment**: a minimal ``env`` (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = the work dir,
  single-threaded BLAS): nothing is inherited, so ``WANDB_API_KEY``, ``HF_TOKEN``, cloud
  credentials and Ray's variables are not visible.
* **Files**: a fresh temp dir per run (``rayrl-sandbox-*``); its ``work/`` subdir is the cwd and
  the only place the child may write; stdout/stderr go to files next to it (not inside it) and
  the whole temp dir is removed afterwards (if the owner itself is SIGKILLed, a later run or
  :func:`cleanup_stale_sandbox_dirs` removes it).
* **Resource limits** set by the child harness before any model code runs: ``RLIMIT_AS``
  (``memory_mb``, default 512), ``RLIMIT_CPU`` (``ceil(timeout_s) + 1`` s), ``RLIMIT_NOFILE``
  (64), ``RLIMIT_FSIZE`` (``max_file_mb``, default 16; ``SIGXFSZ`` is ignored so a big write
  fails with ``EFBIG``), ``RLIMIT_CORE`` 0. (They are set inside the child rather than in a
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
  and ``gc.get_objects/get_referrers/get_referents``; loading a native extension module from
  outside the interpreter's own ``sys.path`` directories (e.g. a ``.so`` written into the work
  dir); ``ctypes`` loading a library or resolving/calling a symbol,
  ``string_at``/``from_address`` (importing ``ctypes`` itself works, so numpy does); fresh
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
  writes a result line only when ``sys.audit`` is called from the harness's runner frame
  (frame identity, which Python code cannot forge), and the runner binds the builtins it needs
  before model code runs. The pipe is moved off the fd number given in ``argv`` and ``argv`` is
  cleared; model code can still write to the pipe, but without the nonce such lines count for
  nothing.

Known limits (this is damage control for buggy or reward-hacking model code, NOT a security
boundary against deliberately malicious code; the subprocess plus audit hooks are a best-effort
guard, and model code shares the interpreter with the harness):

* Audit hooks only see what CPython reports. Native code (a C extension already importable,
  hand-made bytecode via ``types.CodeType``/``marshal``, which the stdlib itself needs) can
  bypass them and could, e.g., read the nonce from the process's memory. Run untrusted code in
  a container/VM (gVisor, firecracker, nsjail) for real isolation.
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
* Processes are bounded by the hook (no fork/exec from Python), not by ``RLIMIT_NPROC``
  (per-user, ignored for root); a native fork that calls ``setsid`` could escape ``killpg``.
* A test string that loops forever costs the whole run's remaining tests (one child, one
  wall clock): passes reported before the timeout still count.
* As root, native code could raise its own rlimits (``CAP_SYS_RESOURCE``); disk use is bounded
  per file (``RLIMIT_FSIZE``) but not in file count.
"""

from __future__ import annotations

import ast
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
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

__all__ = [
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
# The child harness: runs as ``python -I -B -c _HARNESS <payload.json> <result fd>``.
# --------------------------------------------------------------------------------------
_HARNESS = r'''
import ast, fcntl, json, os, resource, signal, sys, threading, time
from types import FrameType, FunctionType, MappingProxyType

REPORT = "rayrl.sandbox.report"  # sys.audit event the runner reports results through
REPORTER_FILE = "<sandbox-reporter>"
REPORTER_NAME = "sandbox_reporter"
REPORTER_TAG = "file '%s'" % REPORTER_FILE  # how a frame running the reporter shows in repr()
# The hook that writes result lines to the pipe. The nonce that authenticates them lives only in
# this code object's constants (no variable, attribute or frame local holds it) and the policy
# hook refuses to hand this code object out. A result line is written only when the caller is
# the runner's own frame (frame identity cannot be forged from Python); anyone may report a
# violation ("V ..."), which never counts as a pass.
REPORTER_SRC = """
def sandbox_reporter(event, args, _runner=_runner, _fd=_fd, _getframe=_getframe, _write=_write,
                     _len=len, _type=type, _str=str, _OSError=OSError):
    if event != "rayrl.sandbox.report" or _len(args) != 1 or _type(args[0]) is not _str:
        return
    line = args[0]
    if line[:2] != "V " and _getframe(1) is not _runner:
        return
    try:
        _write(_fd, (NONCE + " " + line.replace("\\n", " ")[:500] + "\\n").encode("utf-8", "replace"))
    except _OSError:
        pass
"""


def install_reporter(nonce, fd, runner):
    ns = {"_runner": runner, "_fd": fd, "_getframe": sys._getframe, "_write": os.write}
    exec(compile(REPORTER_SRC.replace("NONCE", repr(nonce)), REPORTER_FILE, "exec"), ns)
    hook = ns.pop("sandbox_reporter")
    ns.clear()  # the hook's globals: nothing left to find there
    sys.addaudithook(hook)


def set_limits(P):
    def setlim(which, soft, hard=None):
        hard = soft if hard is None else hard
        cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass
    if P["memory_bytes"]:
        setlim(resource.RLIMIT_AS, P["memory_bytes"])
    setlim(resource.RLIMIT_CPU, P["cpu_s"], P["cpu_s"] + 1)
    setlim(resource.RLIMIT_NOFILE, 64)
    setlim(resource.RLIMIT_FSIZE, P["fsize_bytes"])
    setlim(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def start_watchdog(wall_s):
    """Exit on the wall deadline or when the parent goes away."""
    ppid0 = os.getppid()
    deadline = time.monotonic() + wall_s + 1.0
    def watchdog():
        while True:
            time.sleep(0.2)
            if os.getppid() != ppid0 or time.monotonic() > deadline:
                os._exit(124)
    threading.Thread(target=watchdog, name="sandbox-watchdog", daemon=True).start()


def network_and_process_prelude():
    import socket as _socket_mod, posix, _posixsubprocess
    def _no_net(*a, **k):
        raise PermissionError("sandbox: network access is disabled")
    _AF_UNIX = getattr(_socket_mod, "AF_UNIX", None)
    class _NoSocket(_socket_mod.socket):
        # Only local AF_UNIX sockets (socket.socketpair, used by asyncio's event loop) may be
        # built; connecting or binding them to a path is refused by the audit hook.
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if _AF_UNIX is None or family != _AF_UNIX:
                raise PermissionError("sandbox: network access is disabled")
            super().__init__(family, type, proto, fileno)
    _socket_mod.socket = _NoSocket
    _socket_mod.SocketType = _NoSocket
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "fromfd"):
        if hasattr(_socket_mod, name):
            setattr(_socket_mod, name, _no_net)
    def _no_node(*a, **k):
        raise PermissionError("sandbox: creating special files is disabled")
    for mod in (os, posix):
        for name in ("mkfifo", "mknod"):
            if hasattr(mod, name):
                setattr(mod, name, _no_node)
    # _posixsubprocess is imported here first and its fork_exec replaced; a re-import (after
    # deleting it from sys.modules) is refused by the hook, so the original cannot come back.
    def _no_spawn(*a, **k):
        raise PermissionError("sandbox: starting processes is disabled")
    _posixsubprocess.fork_exec = _no_spawn
    return _AF_UNIX


def install_policy(work, af_unix):
    """The audit hook that refuses writes outside ``work``, processes, network, ... (see the
    module docstring). It holds no secret, and its tables are immutable."""
    # Only C functions from here on: model code can monkeypatch os/posixpath (e.g.
    # posixpath._joinrealpath) but not these already-bound builtins.
    fspath, getcwd, readlink, lstat, stat = os.fspath, os.getcwd, os.readlink, os.lstat, os.stat
    decode, fs_encoding, exact = bytes.decode, sys.getfilesystemencoding(), "".join
    audit = sys.audit
    _type, _repr, _FrameType, _FunctionType = type, repr, FrameType, FunctionType
    _tag, _name = REPORTER_TAG, REPORTER_NAME  # a reporter frame's repr: "<frame ..., file '<sandbox-reporter>', ...>"
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    work = os.path.realpath(work)
    work_prefix = work + os.sep
    MYPID = os.getpid()
    nviol = [0]
    BLOCK_IMPORTS = frozenset({
        "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_xxinterpqueues", "_interpreters",
        "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_testbuffer",
        "_testmultiphase", "_xxtestfuzz", "_testimportmultiple", "_ctypes_test", "_testclinic",
        "_testsinglephase", "_testexternalinspection"})
    # Extension modules may only come from the interpreter's own directories.
    realpath = os.path.realpath  # (before model code runs)
    trusted = tuple(realpath(p) + os.sep for p in sys.path if p and os.path.isdir(p) and realpath(p) != work)
    CTYPES_DENY = frozenset({"ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
                             "ctypes.string_at", "ctypes.wstring_at", "ctypes.seh_exception"})
    DENY = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.symlink", "os.link", "resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension",
        "sqlite3.load_extension", "pty.spawn", "os.startfile", "winreg.OpenKey", "sys.remote_exec",
        "sys.addaudithook",
        # Introspection that could reach the reporter's code object or rewrite the runner:
        # trace/profile functions see every frame (and may jump lines), gc walks any object.
        "sys.settrace", "sys.setprofile", "gc.get_referrers", "gc.get_referents", "gc.get_objects"})
    PATH_EVENTS = MappingProxyType({
        "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.utime": (0,), "os.truncate": (0,), "os.setxattr": (0,),
        "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,),
        "os.lchown": (0,), "shutil.rmtree": (0,), "shutil.move": (1,), "shutil.copyfile": (1,),
        "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.copytree": (1,), "shutil.chown": (0,),
        "shutil.make_archive": (0,), "shutil.unpack_archive": (1,)})

    def as_str(path):
        """An exact str (a str subclass could lie through its methods), or None."""
        try:
            p = fspath(path)
        except TypeError:
            return None
        if isinstance(p, bytes):
            p = decode(p, fs_encoding, "surrogateescape")
        return exact((p,))

    def absolute(p):
        return p if p.startswith("/") else getcwd() + "/" + p

    def lexical(p):
        """os.path.normpath, for an exact str."""
        out = []
        for c in p.split("/"):
            if c == "..":
                if out and out[-1] != "..":
                    out.pop()
                elif not p.startswith("/"):
                    out.append(c)
            elif c and c != ".":
                out.append(c)
        return ("/" if p.startswith("/") else "") + "/".join(out)

    def resolve(p):
        """os.path.realpath (non-strict) of an absolute exact str, with C calls only."""
        todo, done, links = p.split("/")[::-1], "", 0
        while todo:
            c = todo.pop()
            if c == "..":
                done = done.rpartition("/")[0]
            elif c and c != ".":
                new = done + "/" + c
                try:
                    is_link = lstat(new).st_mode & 0o170000 == 0o120000
                except (OSError, ValueError):
                    is_link = False
                links += is_link
                if not is_link or links > 40:
                    done = new
                    continue
                target = readlink(new)
                if target.startswith("/"):
                    done = ""
                todo.extend(target.split("/")[::-1])
        return done or "/"

    def isdir(p):
        try:
            return stat(p).st_mode & 0o170000 == 0o040000
        except (OSError, ValueError):
            return False

    def inside(path):
        if type(path) is int:
            # An fd (fchmod, fchown, futimes, ftruncate...): judge the file it refers to. readlink
            # raises no audit event, so this does not recurse into the /proc check below.
            try:
                path = readlink("/proc/self/fd/%d" % path)
            except (OSError, ValueError, OverflowError):
                return False
            if path.endswith(" (deleted)"):
                path = path[:-10]
            if not path.startswith("/"):
                return False  # a pipe, socket, anon inode...
        p = as_str(path)
        if p is None:
            return False
        if not p.startswith("/") and ".." in p.replace("\\", "/").split("/"):
            return False  # relative ".." could be resolved against a dir_fd we cannot see
        full = resolve(absolute(p))
        return full == work or full.startswith(work_prefix) or full == "/dev/null"

    def forbidden_read(p):
        """Another process's /proc entry (e.g. the parent's environ), any process's memory."""
        full = resolve(absolute(p))
        if full in ("/dev/mem", "/dev/kmem", "/dev/port"):
            return True
        # Both the lexical form (a relative path may be resolved against a dir_fd the hook cannot
        # see) and the resolved one (/proc/self/.., /proc//N, /proc/self/root/proc/N, /dev/fd...).
        for q in (lexical(p), full):
            parts = q.split("/")
            for i, part in enumerate(parts[:-1]):
                if part != "proc":
                    continue
                nxt = parts[i + 1]
                if nxt == "kcore" or (nxt.isdecimal() and int(nxt) != MYPID):
                    return True
                if "mem" in parts[i + 1:]:
                    return True
        return False

    def deny(event, detail=""):
        msg = "sandbox: %s%s is not allowed" % (event, (" " + detail) if detail else "")
        if nviol[0] < 20:
            nviol[0] += 1
            audit(REPORT, "V " + event)
        raise PermissionError(msg)


    def hook(event, args):
        if event == "object.__getattr__":
            # Never hand out the reporter's code object (it holds the nonce). Judged without
            # reading the code (that would raise this event again), with names only this hook
            # uses (cells no reachable function shares), so model code cannot rebind them.
            obj, attr = args[0], args[1]
            if attr == "f_code" and _type(obj) is _FrameType and _tag in _repr(obj) or \
                    attr == "__code__" and _type(obj) is _FunctionType and obj.__name__ == _name:
                deny(event, "of the sandbox reporter's code")
            return
        if event == "object.__setattr__" and args[1] == "__code__":
            deny(event, "of __code__")  # would let model code rewrite a hook's helper
        if event == "open":
            path, mode, flags = args
            if type(path) is int or path is None:
                return
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                      (mode is None and isinstance(flags, int) and flags & W)
            if writing:
                if not inside(path):
                    deny("open", "for writing outside the sandbox dir")
                return
            p = as_str(path)
            if p is None:
                return
            if (not p.startswith("/") or "proc" in p or p.startswith("/dev/")) and forbidden_read(p):
                deny("open", "of another process's /proc entry or of process memory")
            if not inside(p):
                try:
                    if isdir(p):
                        deny("open", "of a directory outside the sandbox dir")
                except PermissionError:
                    raise
                except Exception:
                    pass
            return
        if event in DENY or event.startswith("sys.monitoring"):
            deny(event)
        if event.startswith("socket."):
            if event == "socket.__new__" and args[1] == af_unix:
                return  # local pairs only: connect/bind/sendto to any address are denied below
            deny(event)
        if event == "import":
            name = args[0] or ""
            if name.split(".")[0] in BLOCK_IMPORTS:
                deny("import", name)
            filename = args[1]
            if filename is not None:  # an extension module's shared object is about to load
                if not resolve(absolute(as_str(filename) or "")).startswith(trusted):
                    deny("import", "of a native extension outside the interpreter's paths")
            return
        if event.startswith("ctypes."):
            if event in CTYPES_DENY or (event == "ctypes.dlopen" and args[0] is not None):
                deny(event)
            return
        idx = PATH_EVENTS.get(event)
        if idx is not None:
            for i in idx:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    deny(event, "outside the sandbox dir")
            return
        if event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event == "os.kill" and args[0] in (0, MYPID):
                return
            if event == "signal.pthread_kill":
                return
            deny(event)
        if event == "sqlite3.connect":
            db = args[0]
            if as_str(db) not in (":memory:", "") and not inside(db):
                deny(event, "outside the sandbox dir")
        if event.startswith("syslog.") or event.startswith("readline.write") or event.startswith("readline.append"):
            deny(event)

    sys.addaudithook(hook)


LITERALS = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.JoinedStr)


def compile_test(src, i):
    """A test whose only statement is an expression (``add(1, 2) == 3``) is run as ``assert``:
    bare, it would pass whatever it evaluates to. A bare literal or an empty test is no test."""
    name = "<test %d>" % i
    tree = ast.parse(src, name)
    if not tree.body:
        raise ValueError("empty test")
    first = tree.body[0]
    if len(tree.body) == 1 and isinstance(first, ast.Expr):
        if isinstance(first.value, LITERALS):
            raise ValueError("a bare literal is not a test")
        tree.body[0] = ast.copy_location(ast.Assert(test=first.value, msg=None), first)
        ast.fix_missing_locations(tree)
    return compile(tree, name, "exec")


def fmt(e):
    try:
        return ("%s: %s" % (type(e).__name__, e))[:300]
    except BaseException:
        return type(e).__name__


def flush_std():
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            s.flush()
        except BaseException:
            pass


def run(P, result_fd, _exec=exec, _dict=dict, _audit=sys.audit, _compile=compile, _exit=os._exit):
    """Runs the model code, then each test in a copy of its namespace (or, in stdio mode, the
    program as ``__main__``). Results are reported from THIS frame only (see REPORTER_SRC);
    builtins it needs are bound as defaults so model code cannot swap them."""
    install_reporter(P.pop("nonce"), result_fd, sys._getframe(0))
    stdio = P["mode"] == "stdio"
    tests = []
    for i, t in enumerate(P.pop("tests")):
        try:
            tests.append((i, compile_test(t, i), None))
        except BaseException as e:
            tests.append((i, None, fmt(e)))
    tests = tuple(tests)
    code = P.pop("code")
    install_policy(P["work"], network_and_process_prelude())
    ns = {"__name__": "__main__" if stdio else "__solution__", "__builtins__": __builtins__}
    _audit(REPORT, "S")
    try:
        _exec(_compile(code, "<solution>", "exec"), ns)
    except MemoryError as e:
        _audit(REPORT, "M " + fmt(e))
        _exit(3)
    except BaseException as e:
        # A stdin/stdout program may end with sys.exit() / exit(0).
        if not (stdio and type(e) is SystemExit and e.code in (None, 0)):
            _audit(REPORT, "E " + fmt(e))
            try:
                sys.stderr.write("solution raised %s\n" % fmt(e))
            except BaseException:
                pass
            flush_std()
            _exit(1)
    if stdio:  # like interpreter shutdown: wait for the program's non-daemon threads
        for t in threading.enumerate():
            if t is not threading.current_thread() and not t.daemon:
                t.join()
    for i, test_code, compile_error in tests:
        if test_code is None:
            _audit(REPORT, "T %d 0 F %s" % (i, compile_error))
            continue
        try:
            _exec(test_code, _dict(ns))
        except MemoryError as e:
            _audit(REPORT, "T %d 0 M %s" % (i, fmt(e)))
        except BaseException as e:
            _audit(REPORT, "T %d 0 F %s" % (i, fmt(e)))
        else:
            _audit(REPORT, "T %d 1" % i)
    flush_std()
    _audit(REPORT, "D")
    _exit(0)


def main():
    global install_policy
    # The policy hook's functions get private globals and builtins: model code that
    # monkeypatches builtins (any, isinstance, repr...) or this module does not change them.
    import builtins
    install_policy = FunctionType(install_policy.__code__, dict(globals(), __builtins__=dict(vars(builtins))))
    payload_path, fd = sys.argv[1], int(sys.argv[2])
    with open(payload_path, encoding="utf-8") as f:
        P = json.load(f)
    os.remove(payload_path)  # the model code must not read the tests (or the nonce)
    # Move the result pipe off the fd number named in argv, and forget argv.
    result_fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 40)
    os.close(fd)
    del sys.argv[1:]
    set_limits(P)
    start_watchdog(P["wall_s"])
    run(P, result_fd)


main()
'''


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


def _normalize_output(text: str) -> str:
    """Trailing whitespace of each line and trailing blank lines do not count."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()


def _as_tests(tests: Any) -> list[str] | list[StdioCase]:
    """``tests`` as a list of test strings or of :class:`StdioCase` (mixing is an error)."""
    if tests is None:
        return []
    if isinstance(tests, str):
        return [tests]
    if isinstance(tests, dict) or (isinstance(tests, (list, tuple)) and tests and isinstance(tests[0], dict)):
        return _stdio_cases(tests)
    items = list(tests)
    if all(isinstance(t, str) for t in items):
        return items
    if all(isinstance(t, StdioCase) for t in items):
        return items
    raise ValueError("tests must be test strings or StdioCase objects (not mixed), got "
                     + ", ".join(sorted({type(t).__name__ for t in items})))


def run_python_sandboxed(
    code: str,
    tests: str | Sequence[str] | Sequence[StdioCase] | dict | None = None,
    *,
    timeout_s: float = 5.0,
    memory_mb: int | None = 512,
    max_file_mb: int = 16,
    network: Literal["auto", "prelude"] = "auto",
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
        network: ``"auto"`` adds an empty network namespace when ``unshare`` works here;
            ``"prelude"`` relies on the in-process guards only.
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
    kwargs = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_file_mb=max_file_mb, network=network,
                  site_packages=site_packages, output_limit=output_limit, python=python)
    if test_list and isinstance(test_list[0], StdioCase):
        return _run_stdio_cases(str(code), test_list, **kwargs)
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
    stdin_text: str | None = None,
    timeout_s: float,
    memory_mb: int | None,
    max_file_mb: int,
    network: str,
    site_packages: bool,
    output_limit: int,
    python: str | None,
) -> tuple[SandboxResult, bytes]:
    """One sandboxed child: ``code`` then ``test_list`` (or, with ``stdin_text``, the program
    as ``__main__`` reading it on stdin). Returns the result and, in stdin mode, all of
    stdout (bounded by ``RLIMIT_FSIZE``)."""
    total = len(test_list)
    if time.monotonic() - _last_sweep > _SWEEP_EVERY_S:
        cleanup_stale_sandbox_dirs()
    root = tempfile.mkdtemp(prefix=f"rayrl-sandbox-{_pid_namespace()}-{os.getpid()}-")
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    nonce = secrets.token_hex(16)
    payload = os.path.join(root, "payload.json")
    with open(payload, "w", encoding="utf-8") as f:
        json.dump({"code": code, "tests": test_list, "nonce": nonce, "work": work,
                   "mode": "tests" if stdin_text is None else "stdio",
                   "memory_bytes": int(memory_mb * 1024 * 1024) if memory_mb else 0,
                   "cpu_s": int(math.ceil(timeout_s)) + 1,
                   "fsize_bytes": int(max_file_mb * 1024 * 1024), "wall_s": float(timeout_s)}, f)
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    in_path = os.path.join(root, "stdin")  # outside work/: the program reads it only as its stdin
    if stdin_text is not None:
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(stdin_text)
    r_fd, w_fd = os.pipe()
    argv = [python or sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"])
    argv += ["-c", _HARNESS, payload, str(w_fd)]
    if network == "auto":
        prefix = network_namespace_prefix()
        if prefix:
            argv = prefix + argv

    passed_ids: set[int] = set()
    failed: dict[int, str] = {}
    violations: list[str] = []
    started = done = mem_seen = False
    solution_error: str | None = None
    killed = False
    proc = None
    t0 = time.monotonic()
    buf = b""
    try:
        stdin_f = open(in_path, "rb") if stdin_text is not None else subprocess.DEVNULL
        try:
            with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
                # A minimal env (nothing inherited) and its own session: the whole process
                # group is SIGKILLed on timeout and after every run.
                proc = subprocess.Popen(argv, stdin=stdin_f, stdout=out_f, stderr=err_f, cwd=work,
                                        env=_child_env(work), close_fds=True, pass_fds=(w_fd,),
                                        start_new_session=True)
        finally:
            if stdin_text is not None:
                stdin_f.close()
        fd, w_fd = w_fd, -1
        os.close(fd)
        deadline = t0 + timeout_s
        eof = False
        while not eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed = True
                break
            ready, _, _ = select.select([r_fd], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(r_fd, 65536)
                if not chunk:
                    eof = True
                buf += chunk
                if len(buf) > 1 << 20:  # a flood on the result pipe: stop listening
                    buf = buf[-(1 << 16):]
            elif proc.poll() is not None:
                # Child gone but pipe still open (a stray descendant): stop waiting.
                break
        kill_process_group(proc.pid)
        try:
            _, wstatus, rusage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wstatus)
            cpu_used = rusage.ru_utime + rusage.ru_stime
        except ChildProcessError:
            proc.wait()
            cpu_used = 0.0
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
        stdout_tail = _tail(out_path, output_limit)
        stderr_tail = _tail(err_path, output_limit)
        stdout_all = _tail(out_path, (max_file_mb << 20) + 1, raw=True) if stdin_text is not None else b""
        _rmtree(root)
    duration = time.monotonic() - t0

    for raw in buf.decode("utf-8", "replace").splitlines():
        if not raw.startswith(nonce + " "):
            continue
        parts = raw[len(nonce) + 1 :].split(" ", 4)
        kind = parts[0]
        if kind == "S":
            started = True
        elif kind == "D":
            done = True
        elif kind == "V" and len(parts) > 1:
            violations.append(parts[1])
        elif kind in ("E", "M"):
            solution_error = " ".join(parts[1:])
            mem_seen = mem_seen or kind == "M"
        elif kind == "T" and len(parts) >= 3 and parts[1].isdigit():
            i = int(parts[1])
            if parts[2] == "1" and i < total:
                passed_ids.add(i)
            else:
                if len(parts) > 3 and parts[3] == "M":
                    mem_seen = True
                failed.setdefault(i, " ".join(parts[4:5]))

    rc = proc.returncode if proc is not None else None
    error = solution_error
    if error is None and failed:
        first = min(failed)
        error = f"test {first} failed: {failed[first]}"
    if killed or rc == 124:
        status: SandboxStatus = "timeout"
        error = error or f"timed out after {timeout_s:g}s"
    elif mem_seen:
        status = "memory"
    elif done:
        status = "ok"
    elif rc is not None and rc < 0 and -rc == signal.SIGXCPU:
        status, error = "timeout", error or "CPU time limit exceeded"
    elif rc is not None and rc < 0 and -rc == signal.SIGKILL:
        # Not our kill: the CPU hard limit or the kernel OOM killer.
        if cpu_used >= math.ceil(timeout_s) + 0.5:
            status, error = "timeout", error or "CPU time limit exceeded"
        else:
            status, error = "memory", error or "killed (out of memory?)"
    elif "MemoryError" in stderr_tail or "Cannot allocate memory" in stderr_tail:
        status, error = "memory", error or "out of memory"
    else:
        status = "error"
        if error is None:
            error = "exited early with code %s" % rc if started else f"sandbox failed to start (code {rc})"
    return SandboxResult(status=status, passed=len(passed_ids), total=total, stdout_tail=stdout_tail,
                         stderr_tail=stderr_tail, error=error, returncode=rc, duration_s=duration,
                         violations=tuple(violations)), stdout_all


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


def _call_based_tests(tests: dict) -> list[str]:
    """APPS/TACO call-based tests, ``{"fn_name": f, "inputs": [[args...], ...], "outputs": [out, ...]}``,
    as assert strings: call ``f`` (a top-level function, or a method of ``Solution()`` as LeetCode-style
    solutions define it) with each argument list and compare with the output. APPS often wraps each
    output in a one-element list, and JSON has no tuples: both are accepted."""
    name, ins, outs = tests.get("fn_name"), tests.get("inputs"), tests.get("outputs")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"python_tests: 'fn_name' must be a Python identifier, got {name!r}")
    if not isinstance(ins, (list, tuple)) or not isinstance(outs, (list, tuple)) or len(ins) != len(outs) or not ins:
        raise ValueError("python_tests: call-based tests need non-empty 'inputs' and 'outputs' lists of the same length")
    asserts = []
    for args, expected in zip(ins, outs):
        args = list(args) if isinstance(args, (list, tuple)) else [args]
        asserts.append(
            f"_fn = globals().get({name!r})\n"
            f"if _fn is None and 'Solution' in globals():\n"
            f"    _fn = getattr(Solution(), {name!r})\n"
            f"_got, _want = _fn(*{args!r}), {expected!r}\n"
            "_norm = lambda v: [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v\n"
            "assert _norm(_got) == _norm(_want) or (isinstance(_want, list) and len(_want) == 1 "
            "and _norm(_got) == _norm(_want[0])), f'returned {_got!r}'\n")
    return asserts


_NOT_DECODED = object()


def normalize_tests(tests: Any) -> str | list[str] | list[StdioCase]:
    """Tests from a dataset field: a test string, a list of them, or stdin/stdout cases.

    * a string of Python (usually asserts) or a list of such strings;
    * stdin/stdout cases: ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO ``input_output``)
      or a list of ``{"input": ..., "output": ...}`` dicts, as objects or as a JSON string;
    * call-based ``{"fn_name", "inputs", "outputs"}`` (APPS/TACO), run as asserts;
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
    *, timeout_s: float = 5.0, memory_mb: int | None = 512, **sandbox_kwargs: Any
) -> Callable[..., float]:
    """Factory: a ``python_tests`` reward with custom sandbox limits.

    The returned function also records its last :class:`SandboxResult` on
    ``fn.last_result`` (per process), for callers that want the failure reason.
    """

    def python_tests(prompt: str, completion: str, tests: Any = None, **fields: Any) -> float:
        """Fraction of the row's ``tests`` passed by the completion's code, run sandboxed.

        ``tests``: assert strings (a bare expression such as ``"f(1) == 2"`` is asserted) or
        stdin/stdout cases (see the module docstring and :func:`normalize_tests`)."""
        score, result = score_python_tests(completion, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                                           **sandbox_kwargs)
        python_tests.last_result = result
        return score

    python_tests.last_result = None
    return python_tests


python_tests = make_python_tests()
