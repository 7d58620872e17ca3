"""Chaining stages: each stage's final model becomes the next stage's ``model.path``.

A pipeline file:

    output_dir: runs/pipeline
    stages:
      - name: sft
        config: examples/sft.yaml          # a stage config (paths relative to this file)
        overrides: [train.max_steps=600]   # optional dotted overrides
      - name: dpo
        config: examples/dpo.yaml

Stage i writes into ``output_dir/<name>``; from the second stage on, ``model.path`` is set to the
previous stage's ``final/``, or to a named earlier stage's with ``model_from: NAME``. An override value
may name any earlier stage's final model as ``{stage:NAME}``. RLHF (base -> SFT -> RM -> PPO), where
the policy starts from SFT and the reward model is the rm stage's::

      - name: ppo
        config: examples/ppo.yaml
        model_from: sft
        overrides: ["reward_model.path={stage:rm}"]

Every stage config is validated before the first stage starts. A stage that completed (its
``final/`` and a completion marker exist) is not rerun: rerunning the pipeline resumes at the first
unfinished stage.

Run:  rayrl pipeline PIPELINE.yaml [key=value ...]   (overrides apply to every stage)
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrl.config import ConfigError, apply_overrides, build_config, load_yaml
from rayrl.outputs import STAGE_DONE_MARKER
from rayrl.stages import run_stage

DONE_MARKER = STAGE_DONE_MARKER


@dataclass(frozen=True)
class PlannedStage:
    name: str
    config: Any  # a validated stage config
    output_dir: Path


def plan_pipeline(path: str | Path, overrides: list[str] | None = None) -> list[PlannedStage]:
    """Validate the pipeline file and every stage config in it (nothing runs)."""
    path = Path(path)
    data, lines = load_yaml(path)
    unknown = set(data) - {"output_dir", "stages"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown key '{key}' (a pipeline has output_dir and stages)")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list of {{name, config, overrides}}")
    output_dir = Path(data.get("output_dir", "runs/pipeline"))
    planned: list[PlannedStage] = []
    names: set[str] = set()
    for index, stage in enumerate(stages):
        where = f"{path}: stages[{index}]"
        if not isinstance(stage, dict) or not {"name", "config"} <= set(stage) or set(stage) - STAGE_KEYS:
            raise ConfigError(f"{where}: each stage needs 'name' and 'config' (and optional 'overrides', "
                              "'model_from')")
        name = str(stage["name"])
        if name in names:
            raise ConfigError(f"{where}: duplicate stage name '{name}'")
        names.add(name)
        config_path = (path.parent / stage["config"]) if not Path(stage["config"]).is_absolute() else Path(stage["config"])
        if not config_path.is_file():
            config_path = Path(stage["config"])  # relative to the working directory
        stage_data, stage_lines = load_yaml(config_path)
        finals = {p.name: str(p.output_dir / "final") for p in planned}
        stage_overrides = [_expand_stage_refs(str(o), finals, where) for o in stage.get("overrides") or []]
        stage_data = apply_overrides(stage_data, [*stage_overrides, *(overrides or [])])
        stage_data["output_dir"] = str(output_dir / name)
        source = stage.get("model_from")
        if source is not None and str(source) not in finals:
            raise ConfigError(f"{where}: model_from '{source}' is not an earlier stage (earlier: {sorted(finals) or 'none'})")
        if planned:  # the named (or previous) stage's final model, whatever the stage config said
            stage_data.setdefault("model", {})["path"] = finals[str(source)] if source is not None else finals[planned[-1].name]
        where_keys = {key: f"{config_path}:{line}" for key, line in stage_lines.items()}
        try:
            config = build_config(stage_data, where_keys)
        except ConfigError as exc:
            raise ConfigError(f"pipeline stage '{name}': {exc}") from None
        planned.append(PlannedStage(name, config, output_dir / name))
    return planned


STAGE_KEYS = {"name", "config", "overrides", "model_from"}
_STAGE_REF = re.compile(r"\{stage:([^}]*)\}")


def _expand_stage_refs(override: str, finals: dict[str, str], where: str) -> str:
    """``{stage:NAME}`` in an override -> that earlier stage's final model directory."""
    def final_of(match: re.Match) -> str:
        name = match.group(1)
        if name not in finals:
            raise ConfigError(f"{where}: override '{override}' names stage '{name}', which is not an earlier "
                              f"stage (earlier: {sorted(finals) or 'none'})")
        return finals[name]

    return _STAGE_REF.sub(final_of, override)


def stage_done(stage: PlannedStage) -> bool:
    return (stage.output_dir / DONE_MARKER).is_file() and (stage.output_dir / "final").is_dir()


def run_pipeline(path: str | Path, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    summary = []
    for stage in plan_pipeline(path, overrides):
        if stage_done(stage):
            record = json.loads((stage.output_dir / DONE_MARKER).read_text())
            print(f"stage '{stage.name}': already complete, skipped")
            summary.append({**record, "skipped": True})
            continue
        print(f"stage '{stage.name}' ({stage.config.algorithm}) -> {stage.output_dir}")
        started = time.perf_counter()
        result = run_stage(stage.config)
        record = {"stage": stage.name, "algorithm": stage.config.algorithm, "final_model": str(result.final_model),
                  "wall_s": round(time.perf_counter() - started, 1), **result.final_eval}
        (stage.output_dir / DONE_MARKER).write_text(json.dumps(record, indent=2))
        summary.append({**record, "skipped": False})
    return summary
