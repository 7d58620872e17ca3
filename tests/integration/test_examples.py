"""Every config in examples/ runs as is from the repo root (shortened by overrides only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayrl.config import load_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.yaml") if p.name != "pipeline.yaml")
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


def test_pipeline_example_runs(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text((REPO / "examples" / "pipeline.yaml").read_text()
                        .replace("output_dir: runs/pipeline", f"output_dir: {tmp_path / 'out'}")
                        .replace("config: ", f"config: {REPO / 'examples'}/"))
    proc = subprocess.run([sys.executable, "-m", "rayrl.cli", "pipeline", str(pipeline), *SHORT], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["stage"] for s in json.loads(proc.stdout[proc.stdout.index("["):])] == ["sft", "dpo", "grpo"]
