"""Every config in examples/ runs as is from the repo root (shortened by overrides only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayrl.config import load_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("pipeline"))
SHORT = ["train.max_steps=2", "train.warmup_steps=0", "eval.at_start=false", "eval.every_steps=0",
         "eval.max_examples=8", "checkpoint.every_steps=0", "tracking.progress=false", "tracking.wandb.mode=disabled"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_validates(name):
    load_config(REPO / "examples" / name)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_as_is(tmp_path, name):
    proc = subprocess.run([sys.executable, "-m", "rayrl.cli", "train", f"examples/{name}", f"output_dir={tmp_path}",
                           *SHORT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["steps"] == 2
    assert (tmp_path / "final" / "config.json").exists()


@pytest.mark.parametrize("name,stages", [("pipeline.yaml", ["sft", "dpo", "grpo"]),
                                         ("pipeline_rlhf.yaml", ["sft", "rm", "ppo"])])
def test_pipeline_example_runs(tmp_path, name, stages):
    import yaml

    source = yaml.safe_load((REPO / "examples" / name).read_text())
    pipeline = tmp_path / name
    pipeline.write_text((REPO / "examples" / name).read_text()
                        .replace(f"output_dir: {source['output_dir']}", f"output_dir: {tmp_path / 'out'}")
                        .replace("config: ", f"config: {REPO / 'examples'}/"))
    proc = subprocess.run([sys.executable, "-m", "rayrl.cli", "pipeline", str(pipeline), *SHORT], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("\n[\n") + 1:])  # the JSON list ends stdout
    assert [s["stage"] for s in summary] == stages
    if name == "pipeline_rlhf.yaml":  # PPO ran from the SFT model with the rm stage's reward model
        ppo = yaml.safe_load((tmp_path / "out" / "ppo" / "config.yaml").read_text())
        assert ppo["model"]["path"] == str(tmp_path / "out" / "sft" / "final")
        assert ppo["reward_model"]["path"] == str(tmp_path / "out" / "rm" / "final")
