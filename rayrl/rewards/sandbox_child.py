"""The sandbox's child program: runs model code and its tests inside the sandboxed interpreter.

:mod:`rayrl.rewards.code_sandbox` starts it as
``python -I -B [-S] sandbox_child.py <payload fd> <result fd>`` (see that module's docstring
for the protocol, the isolation layers and their known limits), under strict isolation inside
the bubblewrap sandbox of :mod:`rayrl.rewards.isolation`. In the child, :func:`main` reads the
payload (code, tests, nonce, limits) from its fd and closes it, moves the result pipe off the fd
named in ``argv``, sets the resource limits, starts the watchdog, installs the reporter and
policy audit hooks and the network/process prelude, then runs the code and each test,
reporting ``<nonce> <result>`` lines on the pipe.

Standalone on purpose: it may run under another interpreter (``run_python_sandboxed``'s
``python``) or with ``-S``, where ``rayrl`` is not importable, and it must put its guards in
place before anything else runs; so it uses the standard library only, nothing from ``rayrl``.
Importing it does nothing (all the work is in :func:`main`), so tests can import its helpers.
"""

import _posixsubprocess
import ast
import builtins
import fcntl
import json
import os
import posix
import resource
import select
import signal
import socket
import sys
import threading
import time
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
# It stays a source string compiled at run time, on purpose: the nonce must be a constant of a
# code object that exists only in the child (never in this file or a .pyc), and the fake file
# name REPORTER_FILE is how the policy hook recognises the reporter's frames.
REPORTER_SRC = """
def sandbox_reporter(event, args, _runner=_runner, _fd=_fd, _getframe=_getframe, _write=_write,
                     _len=len, _type=type, _str=str, _OSError=OSError):
    if event != "rayrl.sandbox.report" or _len(args) != 1 or _type(args[0]) is not _str:
        return
    line = args[0]
    if line[:2] != "V " and _getframe(1) is not _runner:
        return
    line = line.replace("\\n", " ")[:65536 if line[:2] == "R " else 500]
    try:
        _write(_fd, (NONCE + " " + line + "\\n").encode("utf-8", "replace"))
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
    if P.get("nproc"):  # only with the sandbox's own uid: the limit counts all of the uid's processes
        setlim(resource.RLIMIT_NPROC, P["nproc"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def start_watchdog(wall_s, lifeline_fd):
    """Exit on the wall deadline, when the parent goes away, or when the scorer does: nobody writes
    to the lifeline pipe, so it turns readable (EOF) only once the scorer's end is closed, also by
    its death (under bubblewrap the parent is the sandbox's own init, which outlives the scorer)."""
    ppid0 = os.getppid()
    deadline = time.monotonic() + wall_s + 1.0
    def watchdog():
        while True:
            readable = select.select([lifeline_fd], [], [], 0.2)[0] if lifeline_fd >= 0 else time.sleep(0.2)
            if readable or os.getppid() != ppid0 or time.monotonic() > deadline:
                os._exit(124)
    threading.Thread(target=watchdog, name="sandbox-watchdog", daemon=True).start()


def network_and_process_prelude():
    """Refuse network and special files through the Python APIs, and process spawning through
    ``_posixsubprocess``; returns ``socket.AF_UNIX`` (or None) for the policy hook."""
    def _no_net(*a, **k):
        raise PermissionError("sandbox: network access is disabled")
    _AF_UNIX = getattr(socket, "AF_UNIX", None)
    class _NoSocket(socket.socket):
        # Only local AF_UNIX sockets (socket.socketpair, used by asyncio's event loop) may be
        # built; connecting or binding them to a path is refused by the audit hook.
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if _AF_UNIX is None or family != _AF_UNIX:
                raise PermissionError("sandbox: network access is disabled")
            super().__init__(family, type, proto, fileno)
    socket.socket = _NoSocket
    socket.SocketType = _NoSocket
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, _no_net)
    def _no_node(*a, **k):
        raise PermissionError("sandbox: creating special files is disabled")
    for mod in (os, posix):
        for name in ("mkfifo", "mknod"):
            if hasattr(mod, name):
                setattr(mod, name, _no_node)
    # _posixsubprocess is imported (at the top, before any hook) and its fork_exec replaced; a
    # re-import (after deleting it from sys.modules) is refused by the hook, so the original
    # cannot come back.
    def _no_spawn(*a, **k):
        raise PermissionError("sandbox: starting processes is disabled")
    _posixsubprocess.fork_exec = _no_spawn
    return _AF_UNIX


def install_policy(work, af_unix, protected_functions=()):
    """The audit hook that refuses writes outside ``work``, processes, network, ... (see the
    code_sandbox module docstring). It holds no secret, and its tables are immutable."""
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
        if event == "object.__setattr__" and args[1] == "__code__" and (
                _type(args[0]) is _FunctionType and (id(args[0]) in protected or args[0].__name__ == _name)):
            deny(event, "of a sandbox function's __code__")  # would let model code rewrite a hook's helper
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

    # The guard's own functions: their code must not be swapped (types.coroutine and friends may
    # set __code__ on other functions, so asyncio works).
    protected = frozenset(id(f) for f in (hook, as_str, absolute, lexical, resolve, isdir, inside,
                                           forbidden_read, deny, *protected_functions))
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


def run(P, result_fd, _exec=exec, _dict=dict, _audit=sys.audit, _compile=compile, _exit=os._exit,
        _dumps=json.dumps):
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
    calls = tuple((name, args) for name, args in P.pop("calls", ()))
    code = P.pop("code")
    install_policy(P["work"], network_and_process_prelude(), (run, fmt, flush_std, compile_test))
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
    for i, (name, args) in enumerate(calls):
        # Call-based cases: the verdict is the parent's; only the returned value (as JSON) goes
        # back, and the expected outputs never enter this process.
        try:
            fn = ns.get(name)
            if fn is None and "Solution" in ns:
                fn = getattr(ns["Solution"](), name)
            if fn is None:
                raise NameError("no function %r" % name)
            out = _dumps(fn(*args))
        except MemoryError as e:
            _audit(REPORT, "T %d 0 M %s" % (i, fmt(e)))
        except BaseException as e:
            _audit(REPORT, "T %d 0 F %s" % (i, fmt(e)))
        else:
            _audit(REPORT, "R %d %s" % (i, out))
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
    """The child's entry point: ``sandbox_child.py <payload fd> <result fd>``."""
    global install_policy
    # The policy hook's functions get private globals and builtins: model code that
    # monkeypatches builtins (any, isinstance, repr...) or this module does not change them.
    install_policy = FunctionType(install_policy.__code__, dict(globals(), __builtins__=dict(vars(builtins))))
    payload_fd, fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(payload_fd, "r", encoding="utf-8") as f:  # closed: model code must not read
        P = json.load(f)  # the tests (or the nonce); the parent has already unlinked the file
    # Move the result pipe off the fd number named in argv, and forget argv.
    result_fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 40)
    os.close(fd)
    del sys.argv[1:]
    set_limits(P)
    start_watchdog(P["wall_s"], P.get("lifeline_fd", -1))
    run(P, result_fd)


if __name__ == "__main__":
    main()
