"""Resolve a reward spec string to a callable: built-in names, ``path/to/file.py:fn``, ``module:fn``.

Reward function contract (per item)::

    fn(prompt: str, completion: str, **fields) -> float

``fields`` are the dataset row's extra fields (e.g. ``answer``, ``tests``). A batched function
sets ``fn.batched = True`` and is called as ``fn(prompts, completions, **fields_lists) ->
list[float]`` (each field becomes a list aligned with the prompts).

Spec strings:

* a built-in name: ``"math_answer"``, ``"exact_match"``, ``"python_tests"``;
* ``"path/to/file.py:fn"``: the file is imported as a module (once per process and absolute
  path); a relative path is resolved against ``base_dir`` (e.g. the config file's directory)
  or the current directory; the file's directory is on ``sys.path`` while it is imported, so
  it can import sibling helper modules;
* ``"package.module:fn"``: an importable module; ``fn`` may be dotted (``"mod:Class.method"``).

With ``options`` the resolved object is treated as a FACTORY and called with them to build the
reward function (the built-ins map to ``make_math_answer``, ``make_exact_match`` and
``make_python_tests``, e.g. ``options={"case_sensitive": False}``).

All resolution problems raise :class:`RewardSpecError` (a ``ValueError``) naming the spec.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import threading
from typing import Any, Callable, Mapping

from rayrl.rewards.code_sandbox import make_python_tests, python_tests
from rayrl.rewards.exact_match import exact_match, make_exact_match
from rayrl.rewards.math_answer import make_math_answer, math_answer

__all__ = [
    "BUILTIN_FACTORIES",
    "REWARD_IMPORT_DEADLINE_S",
    "check_import_finishes",
    "BUILTIN_REWARDS",
    "TRUSTED_BUILTINS",
    "RewardSpecError",
    "is_batched",
    "load_reward_function",
]

RewardFn = Callable[..., Any]

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math_answer": math_answer,
    "exact_match": exact_match,
    "python_tests": python_tests,
}
# Built-ins that run no model code and bound their own work (no eval; numbers capped in length and
# exponent): they score in the scoring process itself, without a forked child per batch. python_tests
# runs the model's code, so it keeps its isolated child.
TRUSTED_BUILTINS = frozenset({"math_answer", "exact_match"})
BUILTIN_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "math_answer": make_math_answer,
    "exact_match": make_exact_match,
    "python_tests": make_python_tests,
}


class RewardSpecError(ValueError):
    """A reward spec that cannot be resolved (unknown name, missing file/module/function...)."""

    def __init__(self, spec: str, message: str):
        self.spec = spec
        self.detail = message
        super().__init__(f"reward function {spec!r}: {message}")


_FILE_MODULES: dict[str, Any] = {}
_LOCK = threading.Lock()


def is_batched(fn: Any) -> bool:
    """True if ``fn`` declares the batched form (``fn.batched = True``)."""
    return getattr(fn, "batched", False) is True


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(spec: str, target: str, base_dir: str | None) -> Any:
    path = os.path.expanduser(target)
    if not os.path.isabs(path):
        path = os.path.join(base_dir if base_dir is not None else os.getcwd(), path)
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        where = f" (relative to {base_dir!r})" if base_dir is not None and not os.path.isabs(target) else ""
        raise RewardSpecError(spec, f"file not found: {path}{where}")
    with _LOCK:
        module = _FILE_MODULES.get(path)
        if module is not None:
            return module
        stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
        name = f"rayrl_user_reward_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise RewardSpecError(spec, f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses/pickle inside the file look themselves up here
        directory = os.path.dirname(path)
        added = directory not in sys.path
        if added:
            sys.path.insert(0, directory)
        try:
            module_spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(name, None)
            raise RewardSpecError(spec, f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if added:
                try:
                    sys.path.remove(directory)
                except ValueError:
                    pass
        _FILE_MODULES[path] = module
        return module


def _import_module(spec: str, target: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise RewardSpecError(spec, f"module {target!r} not found (for a file, use 'path/to/file.py:fn')") from exc
        raise RewardSpecError(spec, f"importing module {target!r} failed: {exc}") from exc
    except Exception as exc:
        raise RewardSpecError(spec, f"importing module {target!r} failed: {type(exc).__name__}: {exc}") from exc


def _check_signature(spec: str, fn: Any) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins/C callables: nothing to check
    try:
        signature.bind_partial("prompt", "completion")
    except TypeError:
        raise RewardSpecError(
            spec, f"{getattr(fn, '__name__', fn)!s}{signature} must accept (prompt, completion, **fields)"
        ) from None


# How long importing a user's reward module may take (checked in a child before the driver imports it).
REWARD_IMPORT_DEADLINE_S = 60.0
_IMPORT_CHECK = (
    "import json, sys\n"
    "from rayrl.rewards.registry import load_reward_function\n"
    "args = json.loads(sys.argv[1])\n"
    "load_reward_function(args['spec'], base_dir=args['base_dir'], options=args['options'])\n"
)


def check_import_finishes(spec: str, *, base_dir: str | None = None, options: Mapping[str, Any] | None = None,
                          deadline_s: float = REWARD_IMPORT_DEADLINE_S) -> None:
    """Load a user's reward (``file.py:fn`` or ``module:fn``) once in a child process under a deadline,
    so that a module that blocks at import (a network call, ``input()``, a lock) is a
    :class:`RewardSpecError` instead of a driver that hangs. Other failures are left to the real load,
    which reports them; built-ins are not checked."""
    if ":" not in str(spec):
        return
    argument = json.dumps({"spec": spec, "base_dir": base_dir, "options": dict(options) if options else None},
                          default=str)
    try:
        subprocess.run([sys.executable, "-c", _IMPORT_CHECK, argument], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=deadline_s,
                       cwd=base_dir or None)
    except subprocess.TimeoutExpired:
        raise RewardSpecError(spec, f"loading it did not finish within {deadline_s:g} s (does the module block "
                                    "at import: a network call, input(), a lock?)") from None


def load_reward_function(spec: str, *, base_dir: str | None = None, options: Mapping[str, Any] | None = None) -> RewardFn:
    """Resolve ``spec`` (see module docstring) to a reward callable.

    Args:
        spec: a built-in name, ``"path/to/file.py:fn"`` or ``"module:fn"``.
        base_dir: directory that relative file paths are resolved against (default: cwd).
        options: if given, the resolved object is a factory called as ``obj(**options)``.

    Raises:
        RewardSpecError: unknown built-in, file or module missing or failing to import,
            attribute missing, object (or factory result) not callable, or a signature that
            cannot take ``(prompt, completion)``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(str(spec), "expected a non-empty string like 'math_answer' or 'rewards.py:my_fn'")
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            # python_tests always goes through its factory: it checks that the sandbox can start.
            obj: Any = BUILTIN_FACTORIES[spec] if options or spec == "python_tests" else BUILTIN_REWARDS[spec]
        else:
            close = difflib.get_close_matches(spec, list(BUILTIN_REWARDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RewardSpecError(
                spec,
                f"unknown built-in reward{hint} (built-ins: {', '.join(sorted(BUILTIN_REWARDS))}; "
                "for your own function use 'path/to/file.py:fn' or 'module:fn')",
            )
    else:
        target, _, attr = spec.rpartition(":")
        if not target or not attr:
            raise RewardSpecError(spec, "expected 'path/to/file.py:fn' or 'module:fn'")
        module = _import_file(spec, target, base_dir) if _looks_like_path(target) else _import_module(spec, target)
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = getattr(module, "__file__", None) or target
                raise RewardSpecError(spec, f"no function {part!r} in {where}{hint}") from None
        if options:
            if not callable(obj):
                raise RewardSpecError(spec, f"options were given but {attr!r} is not a callable factory")
    if options or obj is BUILTIN_FACTORIES.get(spec):
        try:
            obj = obj(**dict(options or {}))
        except Exception as exc:
            raise RewardSpecError(spec, f"building the reward with options {dict(options)!r} failed: "
                                        f"{type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise RewardSpecError(spec, f"{type(obj).__name__} object is not callable")
    _check_signature(spec, obj)
    return obj
