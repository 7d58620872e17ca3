"""Run model-written Python against tests in a sandboxed subprocess (the ``python_tests`` reward).

:func:`run_python_sandboxed` runs ``code`` and then each test (a string of Python, usually
asserts) in ONE child interpreter and returns a :class:`SandboxResult`:
``status`` (``"ok"``, ``"error"``, ``"timeout"``, ``"memory"``), ``passed``/``total`` test counts
and the tails of stdout/stderr. The ``python_tests`` reward wraps it and returns
``passed / total`` (a single test string is 1.0 or 0.0).

Layers of isolation, from the outside in:

* **Process**: ``python -I -B`` (isolated mode: no ``PYTHON*`` variables, no user site, no
  script directory on ``sys.path``; no ``.pyc`` writes), ``start_new_session=True`` so the
  child leads its own process group, ``close_fds`` (only stdout/stderr files and one result
  pipe are passed), stdin is ``/dev/null``.
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
  ``shutil.*`` outside it; any ``os.symlink``/``os.link``; any ``subprocess.Popen``,
  ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.fork``/``forkpty``; ``os.kill``/
  ``killpg`` of another process; ``resource.setrlimit``/``prlimit``; ``sqlite3`` outside the
  work dir; ``syslog``/``readline`` history writes; reading another process's
  ``/proc/<pid>/...`` (e.g. the parent's ``environ``); loading a native extension module from
  outside the interpreter's own ``sys.path`` directories (e.g. a ``.so`` written into the work
  dir); ``ctypes`` loading a library or resolving/calling a symbol,
  ``string_at``/``from_address`` (importing ``ctypes`` itself works, so numpy does); fresh
  imports of ``_xxsubinterpreters`` (a subinterpreter would not carry the hook) and the
  ``_test*`` C modules. Writes to ``/dev/null`` are allowed. ``_posixsubprocess.fork_exec``,
  ``os.mkfifo`` and ``os.mknod`` have no audit event and are replaced by refusing stubs
  (re-importing ``_posixsubprocess`` to get the original is refused).

Known limits (this is damage control for buggy or reward-hacking model code, NOT a security
boundary against deliberately malicious code):

* Audit hooks only see what CPython reports. Native code (a C extension already importable,
  hand-made bytecode via ``types.CodeType``/``marshal``, which the stdlib itself needs) can
  bypass them; so can anything in the same interpreter that tampers with the harness (e.g.
  reading its result-channel nonce through frame introspection to forge a pass). Run untrusted
  code in a container/VM (gVisor, firecracker, nsjail) for real isolation.
* Reads are not restricted (imports need them): world-readable files can be read.
* Without a network namespace, native code could still open sockets; with it, filesystem
  Unix sockets outside are only blocked by the audit hook.
* Processes are bounded by the hook (no fork/exec from Python), not by ``RLIMIT_NPROC``
  (per-user, ignored for root); a native fork that calls ``setsid`` could escape ``killpg``.
* A test that loops forever costs the whole run's remaining tests (one child, one wall
  clock): passes reported before the timeout still count.
* As root, native code could raise its own rlimits (``CAP_SYS_RESOURCE``); disk use is bounded
  per file (``RLIMIT_FSIZE``) but not in file count.
"""

from __future__ import annotations

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
import json, os, resource, signal, sys, threading, time

def _main():
    payload_path, result_fd = sys.argv[1], int(sys.argv[2])
    with open(payload_path, encoding="utf-8") as f:
        P = json.load(f)
    os.remove(payload_path)  # the model code must not read the tests
    nonce = P["nonce"]
    realpath, join, isabs, isdir = os.path.realpath, os.path.join, os.path.isabs, os.path.isdir
    fspath, getcwd = os.fspath, os.getcwd
    work = realpath(P["work"])
    MYPID = os.getpid()

    def report(line):
        try:
            os.write(result_fd, (nonce + " " + line.replace("\n", " ")[:500] + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    # ---- resource limits (before any model code) ----
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

    # ---- watchdog: exit on wall deadline or when the parent goes away ----
    ppid0 = os.getppid()
    deadline = time.monotonic() + P["wall_s"] + 1.0
    def watchdog():
        while True:
            time.sleep(0.2)
            if os.getppid() != ppid0 or time.monotonic() > deadline:
                os._exit(124)
    threading.Thread(target=watchdog, name="sandbox-watchdog", daemon=True).start()

    # ---- network prelude ----
    import socket as _socket_mod
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
    for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "fromfd"):
        if hasattr(_socket_mod, _name):
            setattr(_socket_mod, _name, _no_net)
    import posix
    def _no_node(*a, **k):
        raise PermissionError("sandbox: creating special files is disabled")
    for _mod in (os, posix):
        for _name in ("mkfifo", "mknod"):
            if hasattr(_mod, _name):
                setattr(_mod, _name, _no_node)

    # ---- audit hook ----
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    work_prefix = work + os.sep
    violations = []
    # Fresh imports of these are refused; _posixsubprocess is imported here first and its
    # fork_exec replaced, so a re-import (after deleting it from sys.modules) cannot restore it.
    BLOCK_IMPORTS = {"_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels",
                     "_xxinterpqueues", "_interpreters", "_interpchannels", "_interpqueues",
                     "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                     "_xxtestfuzz", "_testimportmultiple", "_ctypes_test", "_testclinic",
                     "_testsinglephase", "_testexternalinspection"}
    import _posixsubprocess
    def _no_spawn(*a, **k):
        raise PermissionError("sandbox: starting processes is disabled")
    _posixsubprocess.fork_exec = _no_spawn
    # Extension modules may only come from the interpreter's own directories.
    trusted = tuple(realpath(p) + os.sep for p in sys.path if p and isdir(p) and realpath(p) != work)
    CTYPES_DENY = {"ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
                   "ctypes.string_at", "ctypes.wstring_at", "ctypes.seh_exception"}
    DENY = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "os.symlink", "os.link", "resource.setrlimit", "resource.prlimit",
            "sqlite3.enable_load_extension", "sqlite3.load_extension",
            "pty.spawn", "os.startfile", "winreg.OpenKey", "sys.remote_exec"}
    PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
                   "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,), "os.truncate": (0,),
                   "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,),
                   "os.lchflags": (0,), "os.lchmod": (0,), "os.lchown": (0,),
                   "shutil.rmtree": (0,), "shutil.move": (1,), "shutil.copyfile": (1,),
                   "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.copytree": (1,),
                   "shutil.chown": (0,), "shutil.make_archive": (0,), "shutil.unpack_archive": (1,)}

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open fd: only fds we allowed exist
        try:
            p = fspath(path)
        except TypeError:
            return False
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not isabs(p) and ".." in p.replace("\\", "/").split("/"):
            return False  # relative ".." could be resolved against a dir_fd we cannot see
        full = realpath(p if isabs(p) else join(getcwd(), p))
        return full == work or full.startswith(work_prefix) or full == "/dev/null"

    def deny(event, detail=""):
        msg = "sandbox: %s%s is not allowed" % (event, (" " + detail) if detail else "")
        if len(violations) < 20:
            violations.append(event)
            report("V " + event)
        raise PermissionError(msg)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                      (mode is None and isinstance(flags, int) and flags & W)
            if writing and not inside(path):
                deny("open", "for writing outside the sandbox dir")
            if not writing:
                try:
                    p = os.fsdecode(fspath(path))
                except TypeError:
                    return
                if p.startswith("/proc/"):
                    part = p[6:].split("/", 1)[0]
                    if part.isdigit() and int(part) != MYPID:
                        deny("open", "of another process's /proc entry")
                if not inside(p):
                    try:
                        if isdir(p):
                            deny("open", "of a directory outside the sandbox dir")
                    except PermissionError:
                        raise
                    except Exception:
                        pass
            return
        if event in DENY:
            deny(event)
        if event.startswith("socket."):
            if event == "socket.__new__" and args[1] == _AF_UNIX:
                return  # local pairs only: connect/bind/sendto to any address are denied below
            deny(event)
        if event == "import":
            name = args[0] or ""
            if name.split(".")[0] in BLOCK_IMPORTS:
                deny("import", name)
            filename = args[1]
            if filename is not None:  # an extension module's shared object is about to load
                if not realpath(os.fsdecode(filename)).startswith(trusted):
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
            if str(db) not in (":memory:", "") and not inside(db):
                deny(event, "outside the sandbox dir")
        if event.startswith("syslog.") or event.startswith("readline.write") or event.startswith("readline.append"):
            deny(event)
        if event == "sys.addaudithook":
            deny(event)

    sys.addaudithook(hook)
    del P["nonce"]

    # ---- run the model code, then each test in a copy of its namespace ----
    def fmt(e):
        s = "%s: %s" % (type(e).__name__, e)
        return s[:300]
    tests = P.pop("tests")
    code = P.pop("code")
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    report("S")
    try:
        exec(compile(code, "<solution>", "exec"), ns)
    except MemoryError as e:
        report("M " + fmt(e))
        os._exit(3)
    except BaseException as e:
        report("E " + fmt(e))
        try:
            sys.stderr.write("solution raised %s\n" % fmt(e))
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(1)
    for i, t in enumerate(tests):
        tns = dict(ns)
        try:
            exec(compile(t, "<test %d>" % i, "exec"), tns)
        except MemoryError as e:
            report("T %d 0 M %s" % (i, fmt(e)))
        except BaseException as e:
            report("T %d 0 F %s" % (i, fmt(e)))
        else:
            report("T %d 1" % i)
    report("D")
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
    os._exit(0)

_main()
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


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


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


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python_sandboxed(
    code: str,
    tests: str | Sequence[str] | None = None,
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
        code: the program (module-level code, executed with ``__name__ == "__solution__"``).
        tests: one test string (``total == 1``), a list of them (each run separately, in a
            copy of the program's namespace, all inside the same child), or None (``total ==
            0``: just run the code).
        timeout_s: wall-clock limit for the whole child (startup, code and all tests).
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
    if isinstance(tests, str):
        test_list = [tests]
    elif tests is None:
        test_list = []
    else:
        test_list = [str(t) for t in tests]
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    total = len(test_list)
    if time.monotonic() - _last_sweep > _SWEEP_EVERY_S:
        cleanup_stale_sandbox_dirs()
    root = tempfile.mkdtemp(prefix=f"rayrl-sandbox-{_pid_namespace()}-{os.getpid()}-")
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    nonce = secrets.token_hex(16)
    payload = os.path.join(root, "payload.json")
    with open(payload, "w", encoding="utf-8") as f:
        json.dump({"code": str(code), "tests": test_list, "nonce": nonce, "work": work,
                   "memory_bytes": int(memory_mb * 1024 * 1024) if memory_mb else 0,
                   "cpu_s": int(math.ceil(timeout_s)) + 1,
                   "fsize_bytes": int(max_file_mb * 1024 * 1024), "wall_s": float(timeout_s)}, f)
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    r_fd, w_fd = os.pipe()
    argv = [python or sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"])
    argv += ["-c", _HARNESS, payload, str(w_fd)]
    if network == "auto":
        prefix = network_namespace_prefix()
        if prefix:
            argv = prefix + argv
    elif network != "prelude":
        raise ValueError(f"network must be 'auto' or 'prelude', got {network!r}")

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
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, cwd=work,
                                    env=_child_env(work), close_fds=True, pass_fds=(w_fd,),
                                    start_new_session=True)
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
        _killpg(proc.pid)
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
            _killpg(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        stdout_tail = _tail(out_path, output_limit)
        stderr_tail = _tail(err_path, output_limit)
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
                         violations=tuple(violations))


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


def normalize_tests(tests: Any) -> str | list[str]:
    """A test string or a list of them from a dataset field.

    A string holding a JSON list of strings (a common way to store lists in a column) is
    decoded: executed as-is it would be a bare list expression that always "passes".
    Raises ValueError for a missing or empty field.
    """
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                decoded = json.loads(stripped)
            except ValueError:
                decoded = None
            if isinstance(decoded, list) and all(isinstance(t, str) for t in decoded):
                tests = decoded
    elif tests is not None and not isinstance(tests, (bytes, dict)):
        try:
            tests = [str(t) for t in tests]
        except TypeError:
            raise ValueError(
                f"python_tests: 'tests' must be a str or a list of str, got {type(tests).__name__}"
            ) from None
    empty = tests is None or isinstance(tests, (bytes, dict)) or len(tests) == 0
    if empty or (isinstance(tests, str) and not tests.strip()):
        raise ValueError("python_tests needs a non-empty 'tests' field (a str or a list of str)")
    return tests


def score_python_tests(
    completion: str, tests: str | Sequence[str], **sandbox_kwargs: Any
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
        """Fraction of the row's ``tests`` passed by the completion's code, run sandboxed."""
        score, result = score_python_tests(completion, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                                           **sandbox_kwargs)
        python_tests.last_result = result
        return score

    python_tests.last_result = None
    return python_tests


python_tests = make_python_tests()
