"""The main job, shortened: summary.json has the documented shape."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_quickstart_writes_summary(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "rayrl.cli", "quickstart", "--output-dir", str(out), "train.max_steps=3",
         "train.warmup_steps=0", "eval.every_steps=0", "eval.max_examples=16", "trainer.num_cpus=1",
         "tracking.wandb.mode=disabled", "tracking.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["stage"] for row in summary] == ["base", "sft", "dpo", "grpo"]
    for row in summary:
        assert set(row) == {"stage", "eval_accuracy", "wall_s"}
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and row["wall_s"] >= 0.0
    assert "held-out accuracy" in proc.stdout
    assert (out / "curves.png").stat().st_size > 1000
