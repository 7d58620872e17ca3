"""The python_tests sandbox: correct/wrong code, timeouts, memory, network, file writes, env.

Every guard test has a control that runs the SAME code unsandboxed and shows the bad thing
really happens there, so a sandbox that silently stopped guarding would fail the test.
"""

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayrl.rewards.code_sandbox import (
    cleanup_stale_sandbox_dirs,
    extract_python_code,
    network_namespace_prefix,
    python_tests,
    run_python_sandboxed,
)

ADD = "def add(a, b):\n    return a + b\n"


def run_unsandboxed(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def test_correct_program_passes_and_wrong_one_fails():
    ok = run_python_sandboxed(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (ok.status, ok.passed, ok.total, ok.score) == ("ok", 2, 2, 1.0)

    wrong = run_python_sandboxed("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(1, 0) == 1"])
    assert (wrong.status, wrong.passed, wrong.total) == ("ok", 1, 2)
    assert "test 0 failed: AssertionError" in wrong.error

    broken = run_python_sandboxed("def add(a, b) return", "assert add(1, 2) == 3")
    assert (broken.status, broken.passed, broken.total) == ("error", 0, 1)
    assert "SyntaxError" in broken.error


def test_python_tests_reward_uses_last_fenced_block():
    completion = (
        "Draft:\n```python\ndef add(a, b):\n    return 0\n```\n"
        "Fixed:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    )
    assert python_tests("prompt", completion, tests="assert add(2, 2) == 4") == 1.0
    assert python_tests("prompt", completion, tests=["assert add(2, 2) == 4", "assert add(1, 1) == 3"]) == 0.5
    assert python_tests("prompt", "def add(a, b):\n    return a + b", tests="assert add(2, 2) == 4") == 1.0
    assert python_tests("prompt", "```python\ndef add(a, b):\n    return 0\n```", tests="assert add(2, 2) == 4") == 0.0
    assert extract_python_code("```py\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n"
    assert extract_python_code("```python\nx = 1\n") == "x = 1\n"  # truncated generation
    with pytest.raises(ValueError, match="tests"):
        python_tests("prompt", "x = 1")
    # A JSON-encoded list column is decoded, not run as an always-passing list expression.
    assert python_tests("prompt", completion, tests='["assert add(2, 2) == 4", "assert add(1, 1) == 3"]') == 0.5
    assert run_python_sandboxed("x = 1", '["assert x == 2"]').passed == 1  # the raw hazard, for contrast


def test_exit_before_tests_is_not_a_pass():
    for code in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):
        result = run_python_sandboxed(code, "assert True")
        assert result.passed == 0 and result.status == "error", (code, result)


def test_infinite_loop_times_out_and_leaves_no_process():
    start = time.monotonic()
    result = run_python_sandboxed(
        "import os\nprint('PID', os.getpid(), flush=True)\nwhile True:\n    pass\n", "assert True", timeout_s=1.0
    )
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.passed == 0
    assert elapsed < 1.0 + 2.0
    pid = int(result.stdout_tail.split("PID", 1)[1].split()[0])  # the child really ran...
    with pytest.raises(ProcessLookupError):  # ...and is gone (killed and reaped)
        os.kill(pid, 0)


def test_sleeping_program_times_out():
    start = time.monotonic()
    result = run_python_sandboxed("import time\ntime.sleep(100)", "assert True", timeout_s=0.5)
    assert result.status == "timeout"
    assert time.monotonic() - start < 2.5


def test_memory_hog_hits_the_limit_quickly():
    start = time.monotonic()
    result = run_python_sandboxed("x = bytearray(1024 * 1024 * 1024)", "assert True", memory_mb=256)
    assert result.status in ("memory", "error") and result.passed == 0
    assert result.status == "memory", result
    assert time.monotonic() - start < 5.0
    # Control: a small allocation under the same limit is fine.
    assert run_python_sandboxed("x = bytearray(16 * 1024 * 1024)", "assert len(x) > 0", memory_mb=256).status == "ok"


@pytest.fixture
def listening_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.3)
    yield server
    server.close()


def accepted_a_connection(server) -> bool:
    try:
        conn, _ = server.accept()
    except (socket.timeout, TimeoutError):
        return False
    conn.close()
    return True


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'x')\ns.close()\n"
RAW_CONNECT = (
    "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
    "s.connect(('127.0.0.1', {port}))\ns.close()\n"
)


@pytest.mark.parametrize("network", ["prelude", "auto"])
@pytest.mark.parametrize("template", [CONNECT, RAW_CONNECT], ids=["socket", "_socket"])
def test_network_is_blocked(listening_server, tmp_path, network, template):
    code = template.format(port=listening_server.getsockname()[1])
    # Control: unsandboxed, this code does reach the server.
    assert run_unsandboxed(code, cwd=tmp_path).returncode == 0
    assert accepted_a_connection(listening_server)

    result = run_python_sandboxed(code, "assert True", network=network)
    assert result.status == "error" and result.passed == 0
    assert "PermissionError" in result.error
    assert not accepted_a_connection(listening_server)


def test_network_namespace_probe_is_cached():
    first = network_namespace_prefix()
    assert network_namespace_prefix() is first
    assert first is None or "--net" in first


@pytest.mark.parametrize(
    "template",
    [
        "open({target!r}, 'w').write('pwned')",
        "import pathlib\npathlib.Path({target!r}).write_text('pwned')",
        "import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'pwned')",
        "import os\nos.system('echo pwned > ' + {target!r})",
        "import subprocess\nsubprocess.run(['touch', {target!r}])",
        "import shutil\nopen('local.txt', 'w').write('pwned')\nshutil.copy('local.txt', {target!r})",
    ],
    ids=["open", "pathlib", "os.open", "os.system", "subprocess", "shutil.copy"],
)
def test_writes_outside_the_temp_dir_fail(tmp_path, template):
    target = str(tmp_path / "pwned.txt")
    code = template.format(target=target)
    # Control: unsandboxed, the same code creates the file.
    run_unsandboxed(code, cwd=tmp_path)
    assert os.path.exists(target)
    os.remove(target)

    result = run_python_sandboxed(code, "assert True")
    assert result.passed == 0 and result.status == "error", result
    assert not os.path.exists(target)


def test_delete_and_rename_outside_fail_but_local_files_work(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    for code in (f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'stolen.txt')"):
        assert run_python_sandboxed(code, "assert True").passed == 0
        assert keep.read_text() == "data"
    # Writing inside the sandbox's own dir is allowed, and reading back works.
    local = (
        "open('notes.txt', 'w').write('hello')\nimport os\nos.mkdir('sub')\nopen('sub/a.txt', 'w').write('x')\n"
        "open(os.devnull, 'w').write('discarded')\n"
    )
    result = run_python_sandboxed(local, "assert open('notes.txt').read() == 'hello'")
    assert (result.status, result.passed) == ("ok", 1)


def test_temp_dir_is_removed():
    result = run_python_sandboxed("import os\nprint('CWD', os.getcwd())\nopen('f.txt', 'w').write('x')", None)
    assert result.status == "ok"
    cwd = result.stdout_tail.split("CWD", 1)[1].split()[0]
    assert "rayrl-sandbox-" in cwd
    assert not os.path.exists(os.path.dirname(cwd))


def test_env_secrets_are_not_visible(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "sk-test-secret-8271")
    code = (
        "import os\nprint(os.environ.get('WANDB_API_KEY'))\nprint(dict(os.environ))\n"
        "try:\n    print(open('/proc/%d/environ' % os.getppid(), 'rb').read())\nexcept Exception as e:\n    print(e)\n"
    )
    # Control: an ordinary child inherits the secret.
    assert "sk-test-secret-8271" in run_unsandboxed(code, cwd=tmp_path).stdout
    result = run_python_sandboxed(code, None)
    assert result.status == "ok"
    assert "sk-test-secret-8271" not in result.stdout_tail + result.stderr_tail
    assert "None" in result.stdout_tail


def test_killed_owner_leaves_no_process_and_its_dir_is_swept():
    # The owner of a run (e.g. a scoring child) is SIGKILLed mid-run, so its `finally` never runs.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            run_python_sandboxed("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(100)", None, timeout_s=30)
        finally:
            os._exit(0)
    pattern = os.path.join(tempfile.gettempdir(), f"rayrl-sandbox-*-{pid}-*", "stdout")
    deadline = time.monotonic() + 10
    while not (glob.glob(pattern) and Path(glob.glob(pattern)[0]).read_text().strip()):
        assert time.monotonic() < deadline, "sandbox did not start"
        time.sleep(0.05)
    stdout_file = Path(glob.glob(pattern)[0])
    sandbox_pid = int(stdout_file.read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert stdout_file.parent.is_dir()  # left behind by the killed owner...
    deadline = time.monotonic() + 3
    while is_running(sandbox_pid):  # ...but the sandbox notices its dead parent and exits,
        assert time.monotonic() < deadline, "orphaned sandbox still running"
        time.sleep(0.05)
    assert cleanup_stale_sandbox_dirs() >= 1  # ...and the dir is swept.
    assert not stdout_file.parent.exists()


def is_running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # an unreaped zombie is not running
