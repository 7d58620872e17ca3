"""`rayrl report`: PNG curves and an HTML page from a hand-made metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rayrl.report import metric_families, render_report


@pytest.fixture
def run_dir(tmp_path):
    rows = [{"step": 0, "eval/loss": 3.0, "eval/accuracy": 0.0}]
    for step in range(1, 11):
        rows.append({"step": step, "loss": 3.0 / step, "lr": 1e-3, "grad_norm": None, "reward/mean": step / 10,
                     "reward/std": 0.1, "time/step": 0.5, "note": "text", "flag": True})
    rows.append({"step": 10, "eval/loss": 1.0, "eval/accuracy": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_families_group_by_prefix_and_skip_non_numbers(run_dir):
    from rayrl.tracking import read_metrics

    families = metric_families(read_metrics(run_dir))
    assert list(families)[:3] == ["loss", "reward", "eval"]
    assert set(families["eval"]) == {"eval/loss", "eval/accuracy"}
    assert families["eval"]["eval/accuracy"] == [(0, 0.0), (10, 0.5)]
    assert "note" not in families and "flag" not in families and "grad_norm" not in families


def test_render_report_writes_pngs_and_html(run_dir):
    paths = render_report(run_dir)
    names = [p.name for p in paths]
    assert names[-1] == "index.html"
    assert {"loss.png", "reward.png", "eval.png", "lr.png", "time.png"} <= set(names)
    for path in paths[:-1]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    page = (run_dir / "report" / "index.html").read_text()
    assert all(f'src="{p.name}"' in page for p in paths[:-1]) and "eval/accuracy" in page


def test_cli_report_and_missing_metrics(run_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "rayrl.cli", "report", *args], capture_output=True, text=True)

    proc = run(str(run_dir), "--to", str(tmp_path / "out"))
    assert proc.returncode == 0 and (tmp_path / "out" / "loss.png").is_file()
    assert str(tmp_path / "out" / "index.html") in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(str(empty))
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr
