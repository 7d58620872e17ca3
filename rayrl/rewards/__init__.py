"""Reward functions and verifiers for RL post-training (GRPO/PPO).

Contract: ``fn(prompt: str, completion: str, **fields) -> float`` where ``fields`` are the
dataset row's extra fields (e.g. ``answer``, ``tests``); a batched function sets
``fn.batched = True`` and takes/returns lists.

* Built-ins: ``math_answer`` (numeric final-answer equivalence), ``exact_match``,
  ``python_tests`` (model code run against asserts in a sandboxed subprocess).
* :func:`load_reward_function` resolves ``"name"``, ``"path/to/file.py:fn"`` or ``"module:fn"``.
* :class:`RewardScorer` combines weighted :class:`RewardSpec` s, turning exceptions, timeouts
  and non-numeric returns into counted failures with a fallback score.
"""

from rayrl.rewards.code_sandbox import (
    SandboxResult,
    extract_python_code,
    make_python_tests,
    python_tests,
    run_python_sandboxed,
    score_python_tests,
)
from rayrl.rewards.exact_match import exact_match, make_exact_match
from rayrl.rewards.math_answer import extract_final_answer, make_math_answer, math_answer, math_answers_equal
from rayrl.rewards.registry import BUILTIN_REWARDS, RewardSpecError, is_batched, load_reward_function
from rayrl.rewards.scoring import RewardScorer, RewardSpec, RewardTimeout, ScoreResult

__all__ = [
    "BUILTIN_REWARDS",
    "RewardScorer",
    "RewardSpec",
    "RewardSpecError",
    "RewardTimeout",
    "SandboxResult",
    "ScoreResult",
    "exact_match",
    "extract_final_answer",
    "extract_python_code",
    "is_batched",
    "load_reward_function",
    "make_exact_match",
    "make_math_answer",
    "make_python_tests",
    "math_answer",
    "math_answers_equal",
    "python_tests",
    "run_python_sandboxed",
    "score_python_tests",
]
