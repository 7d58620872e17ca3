"""The code sandbox as a security boundary: each escape found by the probe of the hardening issue,
tried from inside a ``python_tests`` completion, must fail under ``isolation: strict``.

Two kinds of attacker:

* **Native code.** The harness copy of :func:`unguarded_harness` installs no Python-level guard
  at all (no audit hooks, no network/process prelude): model code then has what native code
  that got past the guard would have, ``ctypes`` calls into libc included. Only the OS layer
  (bubblewrap namespaces, uid, read-only view, seccomp, limits) stands; these tests show it holds.
* **The real configuration** (both layers): correct programs that use asyncio, dataclasses and
  threads pass.

Every attack is bounded so that it cannot harm the machine that runs it: its targets are a
``sleep`` process, a file and a loopback server this test makes for the purpose, and the control
runs (the same code, unsandboxed) touch only those.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rayrl.rewards import code_sandbox
from rayrl.rewards.code_sandbox import SANDBOX_CHILD_PATH, normalize_tests, python_tests, run_python_sandboxed
from rayrl.rewards.isolation import HARNESS_PATH, SANDBOX_UID, check_strict_isolation, runtime_dirs

pytestmark = pytest.mark.security

LIBC = "import ctypes, ctypes.util\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.fixture(scope="module", autouse=True)
def strict_available():
    check_strict_isolation()  # fails (never skips) where the sandbox cannot start: CI must have it


@pytest.fixture
def unguarded_harness(monkeypatch, tmp_path):
    """The child program without its Python-level guard: model code acts as native code would."""
    source = Path(SANDBOX_CHILD_PATH).read_text()
    guard = 'install_policy(P["work"], network_and_process_prelude(), (run, fmt, flush_std, compile_test))'
    assert guard in source
    path = tmp_path / "sandbox_child.py"
    path.write_text(source.replace(guard, "None"))
    monkeypatch.setattr(code_sandbox, "SANDBOX_CHILD_PATH", str(path))
    return path


def run_native(code: str, **kwargs):
    """Run ``code`` (with the guard gone) under strict isolation; its output is in stdout_tail."""
    result = run_python_sandboxed(code, None, isolation="strict", timeout_s=kwargs.pop("timeout_s", 10), **kwargs)
    assert result.status == "ok", result
    return result


def run_unsandboxed(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=30)


def test_the_guard_is_really_gone(unguarded_harness):
    # Without the guard, ctypes reaches libc (refused by the guard), so the tests below are native-code tests.
    result = run_native(LIBC + "print('pid', libc.getpid())")
    assert "pid " in result.stdout_tail


def test_the_real_configuration_has_the_guard_too():
    guarded = run_python_sandboxed(LIBC + "print(libc.getpid())", None, isolation="strict")
    assert guarded.status == "error" and "PermissionError" in guarded.error, guarded


def test_libc_system_runs_no_shell_that_reaches_the_host(unguarded_harness, tmp_path):
    marker = tmp_path / "escaped"
    code = LIBC + f"print('rc', libc.system(b'id > {marker} 2>&1'))\n"
    assert run_unsandboxed(code, tmp_path).returncode == 0 and marker.exists()  # control: it writes
    marker.unlink()
    result = run_native(code)
    assert not marker.exists(), result  # no host path is writable (or even there)


def test_model_code_never_runs_as_root(unguarded_harness):
    # Seen from the host: the interpreter running the harness has an unprivileged uid.
    code = "import time\nprint('started', flush=True)\ntime.sleep(3)\n"
    done = threading.Event()
    uids: list[int] = []

    def watch():
        while not done.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                if HARNESS_PATH.encode() in cmdline and b"bwrap" not in cmdline:
                    line = next(l for l in status.splitlines() if l.startswith("Uid:"))
                    uids.extend(int(u) for u in line.split()[1:])
                    return
            done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_native(code)
    finally:
        done.set()
        watcher.join()
    assert uids, "the sandboxed interpreter was not seen"
    assert 0 not in uids
    if os.geteuid() == 0:
        assert set(uids) == {SANDBOX_UID}


def test_secret_files_of_the_scorer_are_not_readable(unguarded_harness, tmp_path):
    secret = tmp_path / ".netrc"
    secret.write_text("machine api.wandb.ai password sk-secret-4711\n")
    secret.chmod(0o600)
    code = (
        "for path in ['/etc/shadow', %r, os.path.expanduser('~/.netrc')]:\n"
        "    try:\n        print(path, open(path).read())\n"
        "    except OSError as e:\n        print(path, type(e).__name__)\n" % str(secret)
    )
    result = run_native("import os\n" + code)
    assert "sk-secret-4711" not in result.stdout_tail and "root:" not in result.stdout_tail, result
    assert result.stdout_tail.count("Error") == 3, result


def test_only_the_runtime_is_visible(unguarded_harness):
    result = run_native("import os\nprint(sorted(os.listdir('/')), os.getcwd())\nprint(open('/proc/1/cmdline').read())")
    top = eval(result.stdout_tail.splitlines()[0].rsplit(" ", 1)[0])
    # The OS dirs, the sandbox's own, and the top dirs holding the interpreter and its environment
    # (wherever the checkout lives); nothing else of the host.
    runtime_tops = {d.strip("/").split("/")[0] for d in runtime_dirs(sys.executable)}
    expected = {"usr", "lib", "lib64", "lib32", "libx32", "bin", "sbin", "etc", "proc", "dev", "sandbox",
                ".rayrl-sandbox", "tmp"} | runtime_tops
    assert set(top) <= expected, (sorted(top), sorted(expected))
    assert "/sandbox" in result.stdout_tail
    assert "bwrap" in result.stdout_tail or "sandbox_child" in result.stdout_tail  # pid 1 is the sandbox's own


def test_host_processes_cannot_be_signalled(unguarded_harness, tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = LIBC + (
            "import errno, signal\n"
            "SYS_pidfd_open = 434\n"
            f"for pid in ({victim.pid}, {os.getpid()}, os.getppid(), 1):\n"
            "    fd = libc.syscall(SYS_pidfd_open, pid, 0)\n"
            "    print('pidfd_open', pid, fd, errno.errorcode.get(ctypes.get_errno()))\n"
            f"for pid in ({victim.pid}, {os.getpid()}):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n        print('killed', pid)\n"
            "    except OSError as e:\n        print('kill', pid, type(e).__name__)\n"
        )
        result = run_native("import os\n" + code)
        assert victim.poll() is None, result  # still alive
        assert "killed" not in result.stdout_tail
        assert "pidfd_open 1 -1 EPERM" in result.stdout_tail, result  # seccomp, even for its own pid 1
    finally:
        victim.kill()
        victim.wait()


def test_loopback_servers_are_unreachable(unguarded_harness):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    try:
        code = (
            "import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n"
        )
        result = run_native(code)
        assert "connected" not in result.stdout_tail and "refused" in result.stdout_tail, result
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_dev_shm_files_do_not_persist(unguarded_harness):
    name = f"rayrl-escape-{secrets.token_hex(4)}"
    result = run_native(f"open('/dev/shm/{name}', 'w').write('x' * 1000)\nopen('{name}', 'w').write('y')\nprint('wrote')")
    assert "wrote" in result.stdout_tail
    assert not os.path.exists(f"/dev/shm/{name}")  # the work dir is a tmpfs of the sandbox's own too


def test_dev_shm_is_size_capped(unguarded_harness):
    # 64 files of 1 MiB, each under the file-size limit: the tmpfs size stops them (ENOSPC).
    result = run_native(
        "import errno\ntry:\n    for i in range(64):\n        open('/dev/shm/f%d' % i, 'wb').write(b'x' * (1 << 20))\n"
        "    print('wrote all')\nexcept OSError as e:\n    print('capped', errno.errorcode[e.errno], i)\n")
    assert "capped ENOSPC" in result.stdout_tail, result


def test_debugging_and_kernel_interfaces_are_refused(unguarded_harness):
    code = LIBC + (
        "import errno\n"
        "calls = {'ptrace': (101, 16, 1, 0, 0), 'process_vm_readv': (310, 1, 0, 0, 0, 0, 0),\n"
        "         'unshare': (272, 0x10000000), 'mount': (165, 0, 0, 0, 0, 0), 'bpf': (321, 0, 0, 0),\n"
        "         'keyctl': (250, 0, 0), 'io_uring_setup': (425, 1, 0), 'userfaultfd': (323, 0)}\n"
        "for name, args in calls.items():\n"
        "    rc = libc.syscall(*args)\n"
        "    print(name, rc, errno.errorcode.get(ctypes.get_errno()))\n"
    )
    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers of x86_64")
    result = run_native(code)
    for name in ("ptrace", "process_vm_readv", "unshare", "mount", "bpf", "keyctl", "io_uring_setup", "userfaultfd"):
        assert f"{name} -1 EPERM" in result.stdout_tail, result


def test_no_capabilities_inside(unguarded_harness):
    result = run_native("print([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))])")
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert f"{field}:\\t0000000000000000" in result.stdout_tail, result


# A nonce read from memory (what ctypes.memmove did in the probe) lets native code write result
# lines the parent accepts. For call-based and stdin/stdout tests the verdict is the parent's.
FORGE_WITH_NONCE = """
import gc, os, re
nonce = next(c.strip() for f in gc.get_objects() if type(f).__name__ == 'function' and f.__name__ == 'sandbox_reporter'
             for c in f.__code__.co_consts if isinstance(c, str) and re.fullmatch('[0-9a-f]{32} ?', c))
for fd in range(3, 64):
    try:
        if os.readlink('/proc/self/fd/%d' % fd).startswith('pipe:'):
            for i in range(4):
                os.write(fd, ('%s T %d 1\\n%s R %d 999\\n' % (nonce, i, nonce, i)).encode())
    except OSError:
        pass
print('999')
def add(a, b):
    return 0
"""


def test_forged_results_do_not_pass_call_based_or_stdio_tests(unguarded_harness):
    forged = run_python_sandboxed(FORGE_WITH_NONCE, "assert add(1, 2) == 3", isolation="strict")
    assert forged.passed == 1  # the documented limit: an assert-style verdict comes from the child
    calls = normalize_tests({"fn_name": "add", "inputs": [[1, 2], [2, 2]], "outputs": [3, 4]})
    assert run_python_sandboxed(FORGE_WITH_NONCE, calls, isolation="strict").passed == 0
    stdio = [{"input": "1 2\n", "output": "3"}, {"input": "2 2\n", "output": "4"}]
    assert run_python_sandboxed(FORGE_WITH_NONCE, stdio, isolation="strict").passed == 0


# The real configuration: correct programs pass.
ASYNCIO = """```python
import asyncio
async def _add(a, b):
    await asyncio.sleep(0)
    return a + b
def add(a, b):
    return asyncio.run(_add(a, b))
```"""
DATACLASSES = """```python
from dataclasses import dataclass, field
@dataclass(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: list = field(default_factory=list)
def add(a, b):
    return Point(a).x + Point(b, 1).x
```"""
THREADS = """```python
import threading, queue
from concurrent.futures import ThreadPoolExecutor
def add(a, b):
    q = queue.Queue()
    t = threading.Thread(target=lambda: q.put(a))
    t.start(); t.join()
    with ThreadPoolExecutor(2) as pool:
        return q.get() + pool.submit(lambda: b).result()
```"""


@pytest.mark.parametrize("program", [ASYNCIO, DATACLASSES, THREADS], ids=["asyncio", "dataclasses", "threads"])
def test_correct_programs_pass(program):
    assert python_tests("p", program, tests=["assert add(1, 2) == 3", "add(2, 2) == 4"]) == 1.0
    calls = {"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [3, 10]}
    assert python_tests("p", program, tests=calls) == 1.0
    assert python_tests("p", program, tests={"fn_name": "add", "inputs": [[1, 2]], "outputs": [4]}) == 0.0


def test_a_killed_scorer_leaves_no_sandbox_behind(tmp_path):
    """SIGKILL the process that runs a strict sandbox: the whole sandbox goes with it."""
    script = tmp_path / "owner.py"
    script.write_text(
        "from rayrl.rewards.code_sandbox import run_python_sandboxed\n"
        "run_python_sandboxed(\"import time\\nprint('up', flush=True)\\ntime.sleep(60)\", None, timeout_s=60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)])

    def sandboxed() -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and HARNESS_PATH.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 30
    while not sandboxed():
        assert time.monotonic() < deadline, "the sandbox did not start"
        time.sleep(0.05)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 5
    while sandboxed():
        assert time.monotonic() < deadline, f"sandbox processes left: {sandboxed()}"
        time.sleep(0.05)
