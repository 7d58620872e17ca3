"""benchmarks/gpu_check.py is the script a GPU session runs once, with no time to debug it there: its
trainer-step half runs here on CPU (tiny model, gloo) so that it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"trainer_step"')]
    step = rows[-1]["trainer_step"]
    assert step["tokens_per_s"] > 0 and step["parameters"] > 0
    assert step["loss_first_last"][1] < step["loss_first_last"][0]  # the optimizer steps did something
