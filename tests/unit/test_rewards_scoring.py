"""RewardScorer: weighted totals, fields as kwargs, and failures/timeouts that never crash a run."""

import math
import pickle
import textwrap
import threading
import time

import pytest

from rayrl.rewards.registry import RewardSpecError
from rayrl.rewards.scoring import RewardScorer, RewardSpec

USER_REWARDS = """
import math, os, signal, time

def echo_fields(prompt, completion, answer, **fields):
    # Returns something that depends on every input, so pass-through is checked by value.
    assert prompt.startswith("P"), prompt
    return float(len(completion)) + float(answer) + fields.get("bonus", 0.0)

def flaky(prompt, completion, answer, **fields):
    if completion == "raise":
        raise RuntimeError("boom from user code")
    return 0.25

def sleepy(prompt, completion, answer, **fields):
    if completion == "hang":
        time.sleep(100)
    return 0.5

def wedged(prompt, completion, answer, **fields):
    # Blocks SIGALRM so the per-item alarm cannot fire: only the parent's watchdog can help.
    if completion == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(100)
    return 0.5

def swallow(prompt, completion, answer, **fields):
    if completion == "hang":
        while True:
            try:
                time.sleep(100)
            except BaseException:
                pass
    return 0.5

def dies(prompt, completion, answer, **fields):
    if completion == "die":
        os._exit(7)
    return 0.75

def bad_values(prompt, completion, answer, **fields):
    return {"none": None, "str": "1.0", "nan": math.nan, "inf": math.inf, "int": 1, "bool": True}[completion]

def spawns(prompt, completion, answer, pid_file, wedge=False, **fields):
    # Starts a long-lived process, records its pid, then hangs (wedged: past the alarm too).
    import subprocess
    proc = subprocess.Popen(["sleep", "1000"])
    with open(pid_file, "a") as f:
        f.write(f"{proc.pid}\\n")
    if wedge:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(100)

def huge(prompt, completion, answer, **fields):
    if completion == "inf-ish":
        return 1e300
    if completion == "print":
        os.write(1, b"x" * (32 << 20))  # 32 MiB of output
    return -1e300 if completion == "neg" else 0.5

def daemon(prompt, completion, answer, pid_file, **fields):
    # A child in a session of its own, left running: it must not outlive the scoring.
    import subprocess
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    with open(pid_file, "a") as f:
        f.write(f"{proc.pid}\\n")
    return 1.0

def batch_len(prompts, completions, **fields):
    return [float(len(c)) + float(a) for c, a in zip(completions, fields["answer"])]
batch_len.batched = True

def applies_to_even(prompt, completion, answer, **fields):
    return float(len(completion)) if len(completion) % 2 == 0 else None

def batch_applies_to_even(prompts, completions, **fields):
    return [float(len(c)) if len(c) % 2 == 0 else None for c in completions]
batch_applies_to_even.batched = True

def batch_boom(prompts, completions, **fields):
    raise ValueError("batched boom")
batch_boom.batched = True
"""


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(textwrap.dedent(USER_REWARDS))
    return str(path)


def spec(name, fn, **kw):
    return RewardSpec(name=name, fn=fn, **kw)


def test_weights_combine_and_fields_pass_through(rewards_file):
    scorer = RewardScorer(
        [
            spec("math", "math_answer", weight=2.0),
            spec("exact", "exact_match", weight=0.5),
            spec("echo", f"{rewards_file}:echo_fields", weight=-0.1),
        ]
    )
    prompts = ["P1", "P2", "P3"]
    completions = ["42", "The answer is \\boxed{7}", "nope"]
    fields = [{"answer": "42"}, {"answer": "7", "bonus": 10.0}, {"answer": "5", "prompt": "ignored"}]
    result = scorer.score(prompts, completions, fields)
    assert result.per_function["math"] == [1.0, 1.0, 0.0]
    assert result.per_function["exact"] == [1.0, 0.0, 0.0]
    assert result.per_function["echo"] == [2 + 42, 23 + 7 + 10, 4 + 5]
    # Hand-computed: 2*math + 0.5*exact - 0.1*echo.
    assert result.total == pytest.approx([2 + 0.5 - 4.4, 2 - 4.0, -0.9])
    assert result.failures == {"math": 0, "exact": 0, "echo": 0}
    assert result.timeouts == {"math": 0, "exact": 0, "echo": 0}
    assert result.metrics()["reward/math/mean"] == pytest.approx(2 / 3)
    assert result.metrics()["reward/math/std"] == pytest.approx(3 ** -0.5)  # sample std of [1, 1, 0]


def test_raising_function_falls_back_and_others_are_scored(rewards_file):
    scorer = RewardScorer(
        [spec("flaky", f"{rewards_file}:flaky", fallback=-1.0), spec("exact", "exact_match", weight=10.0)]
    )
    result = scorer.score(["P"] * 3, ["ok", "raise", "a"], [{"answer": "a"}] * 3)
    assert result.per_function["flaky"] == [0.25, -1.0, 0.25]
    assert result.failures["flaky"] == 1 and result.timeouts["flaky"] == 0
    assert result.failed["flaky"] == [False, True, False]
    assert "RuntimeError: boom from user code" in result.errors["flaky"][0]
    assert result.per_function["exact"] == [0.0, 0.0, 1.0]
    assert result.total == pytest.approx([0.25, -1.0, 10.25])


@pytest.mark.parametrize("fn", ["sleepy", "wedged", "swallow"])
def test_hanging_function_times_out_with_fallback(rewards_file, fn):
    scorer = RewardScorer(
        [spec("slow", f"{rewards_file}:{fn}", timeout_s=0.5, fallback=-1.0), spec("exact", "exact_match")],
        grace_s=0.5,
    )
    start = time.monotonic()
    result = scorer.score(["P"] * 4, ["a", "hang", "b", "a"], [{"answer": "a"}] * 4)
    elapsed = time.monotonic() - start
    assert result.per_function["slow"] == [0.5, -1.0, 0.5, 0.5]  # items after the hang still scored
    assert result.timeouts["slow"] == 1 and result.failures["slow"] == 1
    assert result.per_function["exact"] == [1.0, 0.0, 0.0, 1.0]
    # sleepy: the alarm fires at 0.5 s; wedged/swallow: the watchdog kills at 0.5 + 0.5 s.
    assert elapsed < 4.0


@pytest.mark.parametrize("wedge", [False, True], ids=["alarm", "killed"])
def test_processes_a_timed_out_function_started_are_ended(rewards_file, tmp_path, wedge):
    import os

    pid_file = tmp_path / "pids"
    scorer = RewardScorer([spec("spawns", f"{rewards_file}:spawns", timeout_s=0.5)], grace_s=0.5)
    result = scorer.score(["P"], ["x"], [{"answer": "a", "pid_file": str(pid_file), "wedge": wedge}])
    assert result.timeouts["spawns"] == 1
    pid = int(pid_file.read_text().split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # not our child: raises; only the state in /proc matters
        except ChildProcessError:
            pass
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break  # a zombie waiting for init to reap it: ended
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail(f"the 'sleep' process {pid} a reward function started outlived the scoring call")


def test_dying_child_is_a_failure_and_rest_is_scored(rewards_file):
    scorer = RewardScorer([spec("dies", f"{rewards_file}:dies"), spec("exact", "exact_match")])
    result = scorer.score(["P"] * 3, ["a", "die", "a"], [{"answer": "a"}] * 3)
    assert result.per_function["dies"] == [0.75, 0.0, 0.75]
    assert result.failures["dies"] == 1 and result.timeouts["dies"] == 0
    assert "exit code 7" in result.errors["dies"][0]
    assert result.per_function["exact"] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("isolation", ["fork", "none"])
def test_non_numbers_are_counted_failures(rewards_file, isolation):
    scorer = RewardScorer([spec("bad", f"{rewards_file}:bad_values", fallback=-2.0)], isolation=isolation)
    completions = ["none", "str", "nan", "inf", "int", "bool"]
    result = scorer.score(["P"] * 6, completions, [{"answer": 0}] * 6)
    assert result.per_function["bad"] == [-2.0, -2.0, -2.0, -2.0, 1.0, 1.0]
    assert result.failures["bad"] == 3  # None is "does not apply", counted on its own
    assert result.not_applicable["bad"] == 1 and result.failed["bad"] == [False, True, True, True, False, False]
    assert "expected a finite float" in result.errors["bad"][0]
    assert result.excluded == [] and result.excluded_mask == [False] * 6


@pytest.mark.parametrize("fn", ["applies_to_even", "batch_applies_to_even"])
def test_none_and_failures_excluded_with_on_failure_exclude(rewards_file, fn):
    """TRL's semantics on request: an item a function returns None for (or fails on) is marked
    excluded; the other function's fallback items are not."""
    scorer = RewardScorer([spec("even", f"{rewards_file}:{fn}", fallback=-1.0, on_failure="exclude"),
                           spec("flaky", f"{rewards_file}:flaky", fallback=0.0)])
    completions = ["ab", "abc", "raise", "abcd"]
    result = scorer.score(["P"] * 4, completions, [{"answer": 0}] * 4)
    assert result.per_function["even"] == [2.0, -1.0, -1.0, 4.0]  # odd lengths: None -> fallback value, kept finite
    assert result.not_applicable["even"] == 2 and result.failures["even"] == 0
    assert result.failures["flaky"] == 1  # "raise" fails flaky, which falls back: not excluded for it
    assert result.excluded == [False, True, True, False]
    metrics = result.metrics()
    assert metrics["reward/even/not_applicable_rate"] == 0.5 and metrics["reward/excluded_frac"] == 0.5
    # slices and joins keep the mask
    assert type(result).concat([result.slice(0, 1), result.slice(1, 4)]).excluded == result.excluded
    assert type(result).concat([result, result]).not_applicable == {"even": 4, "flaky": 0}
    assert result.with_reward("penalty", [0.0] * 4).excluded == result.excluded
    with pytest.raises(ValueError, match="on_failure must be 'fallback' or 'exclude'"):
        spec("x", "exact_match", on_failure="skip")


def test_batched_functions(rewards_file):
    scorer = RewardScorer(
        [spec("len", f"{rewards_file}:batch_len", weight=2.0), spec("boom", f"{rewards_file}:batch_boom", fallback=0.5)]
    )
    result = scorer.score(["P", "P"], ["ab", "abcd"], [{"answer": 1}, {"answer": 2}])
    assert result.per_function["len"] == [3.0, 6.0]
    assert result.per_function["boom"] == [0.5, 0.5]
    assert result.failures["boom"] == 2
    assert result.total == pytest.approx([6.5, 12.5])


def test_inline_spec_without_timeout_still_catches_errors(rewards_file):
    scorer = RewardScorer([spec("flaky", f"{rewards_file}:flaky", timeout_s=None, fallback=-1.0)])
    result = scorer.score(["P", "P"], ["raise", "x"], [{"answer": 0}] * 2)
    assert result.per_function["flaky"] == [-1.0, 0.25]
    assert result.failures["flaky"] == 1


def test_python_tests_through_the_scorer():
    scorer = RewardScorer([spec("code", "python_tests")])
    completion = "```python\ndef sq(x):\n    return x * x\n```"
    result = scorer.score(["P"], [completion], [{"tests": ["assert sq(3) == 9", "assert sq(2) == 5"]}])
    assert result.per_function["code"] == [0.5]


def test_scoring_from_a_thread_and_after_pickling(rewards_file):
    scorer = RewardScorer([spec("slow", f"{rewards_file}:sleepy", timeout_s=0.5, fallback=-1.0)], grace_s=0.5)
    clone = pickle.loads(pickle.dumps(scorer))  # fine before loading...
    scorer.load()
    clone2 = pickle.loads(pickle.dumps(scorer))  # ...and after: loaded functions are not shipped
    assert clone2._fns is None
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", clone.score(["P", "P"], ["hang", "x"], [{"answer": 0}] * 2)))
    thread.start()
    thread.join(10)
    assert out["r"].per_function["slow"] == [-1.0, 0.5]
    assert out["r"].timeouts["slow"] == 1


def test_configuration_errors_raise():
    with pytest.raises(ValueError, match="duplicate"):
        RewardScorer([spec("a", "exact_match"), spec("a", "math_answer")])
    with pytest.raises(ValueError, match="weight"):
        spec("a", "exact_match", weight=float("nan"))
    with pytest.raises(ValueError, match="timeout_s"):
        spec("a", "exact_match", timeout_s=0)
    scorer = RewardScorer([spec("a", "no_such_reward")])
    with pytest.raises(RewardSpecError, match="'a'"):
        scorer.score(["P"], ["x"], [{}])
    with pytest.raises(ValueError, match="completions"):
        RewardScorer([spec("a", "exact_match")]).score(["P", "P"], ["x"], None)
    assert RewardScorer([spec("a", "exact_match")]).score([], [], []).total == []


def test_scores_are_clipped_to_a_finite_range(rewards_file):
    result = RewardScorer([spec("h", f"{rewards_file}:huge", weight=10.0)]).score(
        ["P", "P", "P"], ["inf-ish", "neg", "ok"], [{"answer": "0"}] * 3)
    assert result.per_function["h"] == [1e6, -1e6, 0.5]
    assert all(math.isfinite(t) for t in result.total) and result.failures["h"] == 0


def test_output_of_reward_functions_is_capped(rewards_file, capfd):
    scorer = RewardScorer([spec("h", f"{rewards_file}:huge")], output_limit=1000)
    start = time.monotonic()
    result = scorer.score(["P"] * 2, ["print", "ok"], [{"answer": "0"}] * 2)
    assert result.per_function["h"] == [0.5, 0.5]
    captured = capfd.readouterr()
    assert len(captured.out) + len(captured.err) < 10_000  # 32 MiB printed, 1000 bytes passed on
    assert time.monotonic() - start < 30


def test_items_that_time_out_are_paid_side_by_side(rewards_file):
    scorer = RewardScorer([spec("s", f"{rewards_file}:sleepy", timeout_s=1.0)], concurrency=4)
    completions = ["hang", "ok"] * 4  # four hanging items
    start = time.monotonic()
    result = scorer.score(["P"] * 8, completions, [{"answer": "0"}] * 8)
    elapsed = time.monotonic() - start
    assert result.timeouts["s"] == 4 and result.per_function["s"][1::2] == [0.5] * 4
    assert elapsed < 3.5, elapsed  # one after another: 4+ s


def test_children_in_a_session_of_their_own_are_ended(rewards_file, tmp_path):
    pid_file = tmp_path / "pids"
    result = RewardScorer([spec("d", f"{rewards_file}:daemon")]).score(
        ["P"], ["x"], [{"answer": "0", "pid_file": str(pid_file)}])
    assert result.per_function["d"] == [1.0]
    (pid,) = [int(line) for line in pid_file.read_text().split()]
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the reward function's daemon outlived the scoring"
        time.sleep(0.05)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_trusted_builtins_score_in_process_and_user_functions_in_a_child(rewards_file, monkeypatch):
    import multiprocessing.context

    forked = []
    real = multiprocessing.context.ForkProcess.start
    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", lambda self: (forked.append(self), real(self)))
    builtins = RewardScorer([spec("m", "math_answer"), spec("e", "exact_match")])
    result = builtins.score(["P", "P"], ["The answer is 4", "5"], [{"answer": "4"}, {"answer": "4"}])
    assert result.per_function == {"m": [1.0, 0.0], "e": [0.0, 0.0]} and forked == []
    RewardScorer([spec("h", f"{rewards_file}:huge")]).score(["P"], ["ok"], [{"answer": "0"}])
    assert len(forked) == 1  # a user function keeps its isolated child
