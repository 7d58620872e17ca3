"""Tracking: sample tables (rows, samples.jsonl, the W&B table in an offline run), resume truncation."""

from __future__ import annotations

import json

import pytest

from builtin_configs import build_config
from rayrl.config import WandbConfig
from rayrl.tracking import (SAMPLES_FILE, Tracker, build_wandb_table, read_metrics, read_samples, sample_rows,
                            sample_table_due, truncate_metrics)


def test_sample_rows_go_round_robin_over_groups_with_per_function_columns():
    prompts = [p for p in ("1+1=", "2+2=", "3+3=") for _ in range(2)]
    completions = ["2", "3", "4", "5", "6", "7"]
    rows = sample_rows(5, prompts, completions, [1.0, 0.0, 1.0, 0.0, 1.0, float("nan")], group_size=2, limit=4,
                       per_function={"correct": [1, 0, 1, 0, 1, 0]}, extra={"policy_version": [4] * 6})
    # sample 0 of every prompt first, then sample 1
    assert [(r["prompt"], r["completion"]) for r in rows] == [("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6"),
                                                              ("1+1=", "3")]
    assert rows[0] == {"step": 5, "prompt": "1+1=", "completion": "2", "reward": 1.0, "reward/correct": 1.0,
                       "policy_version": 4}
    assert len(sample_rows(5, prompts, completions, [0.0] * 6, group_size=2, limit=100)) == 6
    nan_row = sample_rows(5, prompts, completions, [float("nan")] * 6, group_size=2, limit=1)[0]
    assert nan_row["reward"] is None  # JSON has no NaN
    with pytest.raises(ValueError, match="differ"):
        sample_rows(1, prompts[:2], completions, [0.0] * 6, group_size=2, limit=4)


def test_sample_table_due():
    assert [s for s in range(1, 10) if sample_table_due(3, s)] == [3, 6, 9]
    assert not any(sample_table_due(0, s) for s in range(1, 10))


def test_tracking_config_keys():
    config = build_config({"algorithm": "grpo", "output_dir": "x",
                           "tracking": {"sample_table_every": 5, "sample_table_rows": 4}})
    assert config.tracking.sample_table_every == 5 and config.tracking.sample_table_rows == 4
    assert build_config({"algorithm": "grpo", "output_dir": "x"}).tracking.sample_table_every == 0  # off by default
    with pytest.raises(Exception, match="sample_table_rows"):
        build_config({"algorithm": "grpo", "output_dir": "x", "tracking": {"sample_table_rows": 0}})


def test_samples_jsonl_without_wandb_and_truncated_on_resume(tmp_path):
    tracker = Tracker(tmp_path, config={}, wandb=WandbConfig(mode="disabled"), total_steps=4, progress=False)
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step})
        tracker.log_samples(step, [{"step": step, "prompt": "p", "completion": f"c{step}-{i}", "reward": 1.0}
                                   for i in range(2)])
    tracker.log_samples(4, [])  # nothing to write
    tracker.close()
    rows = read_samples(tmp_path)
    assert [(r["step"], r["completion"]) for r in rows] == [(1, "c1-0"), (1, "c1-1"), (2, "c2-0"), (2, "c2-1"),
                                                            (3, "c3-0"), (3, "c3-1")]
    truncate_metrics(tmp_path, 2)  # a resume from step 2 drops later metrics and samples alike
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 1, 2, 2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_wandb_table_in_an_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"step": 2, "prompt": "12+30=", "completion": "42", "reward": 1.0, "reward/correct": 1.0,
             "policy_version": 1},
            {"step": 2, "prompt": "12+30=", "completion": "41", "reward": 0.0, "reward/correct": 0.0,
             "policy_version": 1}]
    table = build_wandb_table(2, rows)
    assert table.columns == ["step", "prompt", "completion", "reward", "reward/correct", "policy_version"]
    assert table.data[1] == [2, "12+30=", "41", 0.0, 0.0, 1]

    tracker = Tracker(tmp_path, config={"algorithm": "grpo"}, wandb=WandbConfig(mode="offline"), total_steps=2,
                      progress=False)
    tracker.log(2, {"loss": 0.5})
    tracker.log_samples(2, rows)
    tracker.close()
    # the same rows for people without W&B ...
    assert [r["completion"] for r in read_samples(tmp_path)] == ["42", "41"]
    assert (tmp_path / SAMPLES_FILE).exists()
    # ... and the table in the offline run directory (W&B writes a table's data as a media file)
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    tables = list(run_dirs[0].rglob("samples_*.table.json"))
    assert tables, sorted(str(p.relative_to(run_dirs[0])) for p in run_dirs[0].rglob("*"))
    written = json.loads(tables[0].read_text())
    assert written["columns"] == table.columns
    assert [r[2] for r in written["data"]] == ["42", "41"]


def test_describe_placement_line():
    from rayrl.cluster import describe_placement

    record = {"layout": "split", "num_nodes": 2,
              "nodes": {"aaaaaaaaaaaa": {"ip": "127.0.0.1", "head": True, "resources": {"CPU": 1.0}},
                        "bbbbbbbbbbbb": {"ip": "127.0.0.1", "head": False, "resources": {"CPU": 1.0}}},
              "roles": {"trainer": ["aaaaaaaaaaaa", "aaaaaaaaaaaa"], "rollout": ["bbbbbbbbbbbb"],
                        "verifier": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]}}
    assert describe_placement(record) == ("placement (split, 2 node(s)): trainer x2 on n0; rollout x1 on n1; "
                                          "verifier x2 on n0,n1 [n0=aaaaaaaa (head), n1=bbbbbbbb]")


def test_a_non_finite_loss_or_gradient_stops_the_run_naming_the_step(tmp_path):
    from rayrl.checkpoint import CheckpointManager
    from rayrl.tracking import TrainingDiverged, check_finite_training

    checkpoints = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    check_finite_training(3, {"loss": 0.5, "grad_norm": 1.0, "lr": 1e-3}, checkpoints)  # finite: nothing happens
    with pytest.raises(TrainingDiverged, match=r"step 4: loss is nan.*no checkpoint was saved"):
        check_finite_training(4, {"loss": float("nan"), "grad_norm": 1.0}, checkpoints)
    kept = checkpoints.save(5, lambda d: None, {})
    with pytest.raises(TrainingDiverged, match=rf"step 6: grad_norm is inf.*{kept.name}, is kept"):
        check_finite_training(6, {"loss": 0.1, "grad_norm": float("inf")}, checkpoints)
    with pytest.raises(TrainingDiverged, match="critic/value_loss"):
        check_finite_training(7, {"critic/value_loss": float("-inf")}, checkpoints)


def test_metrics_files_name_the_bad_line_and_skip_a_last_line_cut_short(tmp_path):
    from rayrl.data.loading import DataError

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')  # a crash mid-write
    assert read_metrics(tmp_path) == [{"step": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path)
