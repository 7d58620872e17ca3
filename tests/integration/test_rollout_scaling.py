"""Resuming a GRPO run with a different number of rollout workers (1 -> 2 -> 1).

Run 1 (one worker, max_steps 3, a checkpoint every step) leaves checkpoints at steps 1 and 2, as a run
stopped after step 2 would. Run 2 resumes it with two workers to step 4, run 3 with one worker to step 5.
Every resumed run must continue from its checkpoint, not from 0: metrics hold each step once, the
policy version goes on counting, and every worker (the new one too) samples with the current weights:
its policy version is the trainer's and its log-probs match the trainer's. A learning rate of 1e-2
and a reward that varies within a group make every step change the weights, so a worker left with
stale (e.g. the initial) weights would show a large sampler/trainer log-prob gap.
"""

from __future__ import annotations

import json
import math

import pytest

from rayrl.config import build_config
from rayrl.tracking import read_metrics, read_samples

pytestmark = pytest.mark.integration


def config(output_dir, model_path, reward_file, *, workers: int, max_steps: int, resume: bool):
    return build_config({
        "algorithm": "grpo", "output_dir": str(output_dir), "seed": 0, "model": {"path": model_path},
        "rewards": [{"fn": f"{reward_file}:varied", "name": "varied"}],
        "rollout": {"backend": "vllm", "num_workers": workers, "num_cpus": 0.25, "group_size": 4,
                    "max_new_tokens": 4, "kv_cache_gib": 0.25},
        "grpo": {"prompts_per_step": 4},
        "train": {"max_steps": max_steps, "micro_batch_size": 16, "lr": 1e-2},
        "trainer": {"world_size": 1, "num_cpus": 0.5},
        "verifier": {"num_workers": 1, "num_cpus": 0.1},
        "data": {"train": "rayrl:addition/prompts-train", "eval": None},
        "eval": {"at_start": False, "every_steps": 0},
        "checkpoint": {"every_steps": 1, "keep_last": 10, "resume": resume},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}, "sample_table_every": 1,
                     "sample_table_rows": 6},
    })


def test_resume_with_more_then_fewer_rollout_workers(ray_cluster, tmp_path, tiny_model_dir, capfd):
    from rayrl.rl import run_rl

    reward_file = tmp_path / "varied.py"
    reward_file.write_text("def varied(prompt, completion, **fields):\n"
                           "    return float(sum(map(ord, completion)) % 5)\n")
    out = tmp_path / "run"

    run_rl(config(out, tiny_model_dir, reward_file, workers=1, max_steps=3, resume=False))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001", "step-00000002"]  # the last step exports final/, no checkpoint
    before = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert list(before) == [1, 2, 3]

    for workers, max_steps, resumed_from in ((2, 4, 2), (1, 5, 3)):
        capfd.readouterr()
        run_rl(config(out, tiny_model_dir, reward_file, workers=workers, max_steps=max_steps, resume=True))
        assert f"(step {resumed_from})" in capfd.readouterr().err  # "resumed from .../step-0000000N (step N)"
        placement = json.loads((out / "placement.json").read_text())
        assert len(placement["roles"]["rollout"]) == workers

        steps = [r for r in read_metrics(out) if "loss" in r]
        assert [r["step"] for r in steps] == list(range(1, max_steps + 1))  # each step once, none from 0
        assert [r["policy_version"] for r in steps] == list(range(1, max_steps + 1))
        # every worker sampled with the weights of the step before (the new one synced on start) ...
        assert [r["policy_version/sampled_min"] for r in steps] == list(range(max_steps))
        for row in steps[resumed_from:]:
            # ... and really holds them: its log-probs are the trainer's
            assert row["logprob_gap/sampler_trainer"] < 1e-3, row
            assert row["grad_norm"] > 0 and math.isfinite(row["loss"])  # the weights did change each step
        # the steps before the resume point are kept as they were; sample rows too, one table per step
        assert all(steps[i - 1]["loss"] == before[i]["loss"] for i in range(1, resumed_from + 1))
        samples = read_samples(out)
        assert sorted({r["step"] for r in samples}) == list(range(1, max_steps + 1))
        assert all(sum(r["step"] == s for r in samples) == 6 for s in range(1, max_steps + 1))
        assert all(r["policy_version"] == r["step"] - 1 and "reward/varied" in r for r in samples)
        before = {r["step"]: r for r in steps}
    assert (out / "final" / "model.safetensors").exists()


def test_rollout_workers_scale_mid_run(ray_cluster, tmp_path, tiny_model_dir):
    """`rayrl scale OUTPUT_DIR rollout.num_workers=N` while the run goes: 1 -> 2 -> 1 workers between
    steps; the new worker samples with the current weights from its first request, every step trains
    on its full batch, and the run logs each step once."""
    import threading
    import time

    from rayrl.cli import main
    from rayrl.rl import run_rl

    reward_file = tmp_path / "varied.py"
    reward_file.write_text("def varied(prompt, completion, **fields):\n"
                           "    return float(sum(map(ord, completion)) % 5)\n")
    out = tmp_path / "elastic"
    run = config(out, tiny_model_dir, reward_file, workers=1, max_steps=7, resume=False)
    run = run.model_copy(update={"checkpoint": run.checkpoint.model_copy(update={"every_steps": 0})})
    answers: list[int] = []
    stop = threading.Event()

    def operator():
        for after_step, workers in ((1, 2), (4, 1)):
            while not stop.is_set() and max([r["step"] for r in _steps(out)], default=0) < after_step:
                time.sleep(0.2)
            answers.append(main(["scale", str(out), f"rollout.num_workers={workers}"]))

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    try:
        run_rl(run)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert answers == [0, 0]
    steps = _steps(out)
    assert [r["step"] for r in steps] == list(range(1, 8))
    workers = [r["rollout/num_workers"] for r in steps]
    first, count = workers.index(2), workers.count(2)
    assert workers == [1] * first + [2] * count + [1] * (7 - first - count) and first > 0 and workers[-1] == 1, workers
    assert all(r["samples/trained"] == 16 for r in steps)
    assert [r["policy_version/sampled_min"] for r in steps] == list(range(7))  # the new worker too
    assert all(r["logprob_gap/sampler_trainer"] < 1e-3 for r in steps)


def _steps(out):
    try:
        return [r for r in read_metrics(out) if "loss" in r]
    except FileNotFoundError:
        return []
