"""Stage configs for unit tests, naming the built-in tiny model and synthetic data explicitly: a run
uses only the model and data its config names, so a test that wants the built-ins says so."""

from __future__ import annotations

import copy
from typing import Any

from rayrl import config as config_module

BUILTIN_MODEL = "rayrl:tiny-llama"
BUILTIN_DATA = {
    "sft": ("rayrl:addition/sft-train", "rayrl:addition/sft-eval"),
    "dpo": ("rayrl:addition/prefs-train", "rayrl:addition/prefs-eval"),
    "rm": ("rayrl:addition/prefs-train", "rayrl:addition/prefs-eval"),
    "grpo": ("rayrl:addition/prompts-train", "rayrl:addition/prompts-eval"),
    "ppo": ("rayrl:addition/prompts-train", "rayrl:addition/prompts-eval"),
}


def with_builtins(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``model.path`` and ``data.train``/``data.eval`` set to the built-ins where it
    leaves them out (an explicit value, ``None`` included, is kept)."""
    filled = copy.deepcopy(config)
    if not isinstance(filled.get("model", {}), dict) or not isinstance(filled.get("data", {}), dict):
        return filled
    filled.setdefault("model", {}).setdefault("path", BUILTIN_MODEL)
    train, evaluation = BUILTIN_DATA.get(filled.get("algorithm"), (None, None))
    if train is not None:
        data = filled.setdefault("data", {})
        data.setdefault("train", train)
        data.setdefault("eval", evaluation)
    return filled


def build_config(data: dict[str, Any], *args: Any, **kwargs: Any):
    """:func:`rayrl.config.build_config` of ``with_builtins(data)``."""
    return config_module.build_config(with_builtins(data), *args, **kwargs)
