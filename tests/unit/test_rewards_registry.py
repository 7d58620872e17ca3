"""Resolving reward specs: built-in names, path.py:fn, module:fn, factories and clear errors."""

import os
import textwrap
import time
from pathlib import Path

import pytest

from rayrl.rewards import exact_match, math_answer, python_tests
from rayrl.rewards.registry import RewardSpecError, is_batched, load_reward_function

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def reward_file(tmp_path):
    return write(
        tmp_path / "my_rewards.py",
        """
        from helper_mod import BONUS  # a sibling module: the file's directory is importable

        def has_answer(prompt, completion, answer, **fields):
            return 1.0 + BONUS if str(answer) in completion else 0.0

        class Scorers:
            @staticmethod
            def length(prompt, completion, **fields):
                return float(len(completion))

        def make_threshold(*, limit):
            def threshold(prompt, completion, **fields):
                return 1.0 if len(completion) <= limit else 0.0
            return threshold

        NOT_A_FUNCTION = 3

        def no_args():
            return 1.0
        """,
    )


@pytest.fixture(autouse=True)
def helper_module(tmp_path):
    write(tmp_path / "helper_mod.py", "BONUS = 0.0\n")


def test_builtins_by_bare_name():
    assert load_reward_function("math_answer") is math_answer
    assert load_reward_function("exact_match") is exact_match
    # python_tests is built by its factory, which checks the sandbox can start here.
    built = load_reward_function(" python_tests ")
    assert built.__name__ == python_tests.__name__ and built("p", "```python\nx = 1\n```", tests="assert x == 1") == 1.0
    insensitive = load_reward_function("exact_match", options={"case_sensitive": False})
    assert insensitive("p", "PARIS", answer="paris") == 1.0


def test_load_from_file_absolute_relative_and_dotted(reward_file, tmp_path, monkeypatch):
    fn = load_reward_function(f"{reward_file}:has_answer")
    assert fn("p", "it is 42", answer="42") == 1.0
    assert fn("p", "it is 41", answer="42") == 0.0
    # Relative to base_dir, and relative to the cwd; the module is imported once.
    assert load_reward_function("my_rewards.py:has_answer", base_dir=str(tmp_path)) is fn
    monkeypatch.chdir(tmp_path)
    assert load_reward_function("./my_rewards.py:has_answer") is fn
    assert load_reward_function("my_rewards.py:Scorers.length")("p", "abc") == 3.0
    threshold = load_reward_function("my_rewards.py:make_threshold", options={"limit": 2})
    assert threshold("p", "ab") == 1.0 and threshold("p", "abc") == 0.0


def test_load_from_module(tmp_path, monkeypatch):
    pkg = tmp_path / "rewardpkg_for_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "scores.py", "def shout(prompt, completion, **fields):\n    return float(completion.isupper())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("rewardpkg_for_test.scores:shout")
    assert fn("p", "HEY") == 1.0 and fn("p", "hey") == 0.0
    assert load_reward_function("os.path:join") is os.path.join  # any importable callable


def test_example_reward_file_loads():
    fn = load_reward_function("examples/rewards/my_reward.py:answer_reward", base_dir=str(REPO))
    assert fn("p", "Reasoning...\nSo the answer is Paris", answer="paris") == 1.0
    assert fn("p", "Paris is nice.\nI am unsure.", answer="paris") == 0.5
    assert fn("p", "London", answer="paris") == 0.0
    batched = load_reward_function("examples/rewards/my_reward.py:brevity_penalty", base_dir=str(REPO))
    assert is_batched(batched) and not is_batched(fn)
    assert batched(["p", "p"], ["short", "w " * 300]) == [0.0, -0.5]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("missing_file.py:fn", "file not found"),
        ("my_rewards.py:has_answr", "did you mean 'has_answer'"),
        ("my_rewards.py:NOT_A_FUNCTION", "not callable"),
        ("my_rewards.py:no_args", "must accept (prompt, completion"),
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
        ("math_anwser", "did you mean 'math_answer'"),
        ("my_rewards.py:", "expected 'path/to/file.py:fn'"),
        ("", "non-empty"),
    ],
)
def test_errors_name_the_spec(reward_file, tmp_path, spec, fragment):
    with pytest.raises(RewardSpecError) as err:
        load_reward_function(spec, base_dir=str(tmp_path))
    assert isinstance(err.value, ValueError)
    assert fragment in str(err.value)
    if spec:
        assert repr(spec) in str(err.value)


def test_import_error_inside_file_is_reported(tmp_path):
    write(tmp_path / "broken.py", "import definitely_not_installed_pkg\n")
    with pytest.raises(RewardSpecError, match="importing .*broken.py failed: ModuleNotFoundError"):
        load_reward_function("broken.py:fn", base_dir=str(tmp_path))
    with pytest.raises(RewardSpecError, match="options"):
        load_reward_function("exact_match", options={"no_such_option": 1})


def test_a_module_that_blocks_at_import_is_an_error_not_a_hang(tmp_path):
    from rayrl.rewards.registry import check_import_finishes

    blocking = tmp_path / "blocking.py"
    blocking.write_text("import time\ntime.sleep(1000)\ndef score(prompt, completion, **fields):\n    return 1.0\n")
    start = time.monotonic()
    with pytest.raises(RewardSpecError, match="did not finish within 2 s"):
        check_import_finishes(f"{blocking}:score", deadline_s=2)
    assert time.monotonic() - start < 10
    fine = tmp_path / "fine.py"
    fine.write_text("def score(prompt, completion, **fields):\n    return 1.0\n")
    check_import_finishes(f"{fine}:score", deadline_s=30)  # passes; a broken one is left to the real load
    check_import_finishes(f"{tmp_path / 'missing.py'}:score", deadline_s=30)
