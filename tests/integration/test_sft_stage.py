"""The SFT stage on a real local Ray cluster with real DeepSpeed ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayrl.config import build_config
from rayrl.sft import run_sft
from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def sft_config(output_dir, **sections):
    data = {
        "algorithm": "sft", "output_dir": str(output_dir), "seed": 0, "model": {"path": "rayrl:tiny-llama"},
        "data": {"train": "rayrl:addition/sft-train", "eval": "rayrl:addition/sft-eval", "max_length": 16},
        "train": {"max_steps": 6, "global_batch_size": 16, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 2},
        "trainer": {"world_size": 1, "num_cpus": 0.5},
        "eval": {"max_examples": 32, "at_start": False},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config(data)


def losses(output_dir):
    return [row["loss"] for row in read_metrics(output_dir) if "loss" in row]


def test_two_ranks_equal_one_rank_on_the_same_global_batch(ray_cluster, tmp_path):
    one = run_sft(sft_config(tmp_path / "one"))  # 1 rank x 2 micro-batches of 8
    two = run_sft(sft_config(tmp_path / "two", trainer={"world_size": 2}))  # 2 ranks x 1 micro-batch
    assert len(losses(one.output_dir)) == 6
    assert losses(one.output_dir) == pytest.approx(losses(two.output_dir), rel=1e-5, abs=1e-6)
    norms = lambda d: [r["grad_norm"] for r in read_metrics(d) if "grad_norm" in r]
    assert norms(one.output_dir) == pytest.approx(norms(two.output_dir), rel=1e-4)
    assert losses(one.output_dir)[-1] < losses(one.output_dir)[0]


def test_zero3_bf16_two_ranks_trains_and_exports(ray_cluster, tmp_path):
    result = run_sft(sft_config(tmp_path / "z3", trainer={"world_size": 2, "zero_stage": 3},
                                model={"dtype": "bfloat16"}, train={"max_steps": 3}))
    rows = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert len(rows) == 3 and all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_equals_uninterrupted(ray_cluster, tmp_path):
    full = run_sft(sft_config(tmp_path / "full", checkpoint={"every_steps": 3}))
    checkpoints = sorted(p.name for p in (full.output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003"]
    # The "stopped" run: the same directory as it stood after step 3 (metrics to step 6 get truncated).
    stopped = tmp_path / "stopped"
    shutil.copytree(full.output_dir, stopped, ignore=shutil.ignore_patterns("final"))
    resumed = run_sft(sft_config(stopped, checkpoint={"every_steps": 3, "resume": True}))
    assert [r["step"] for r in read_metrics(resumed.output_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed.output_dir) == pytest.approx(losses(full.output_dir), rel=1e-6, abs=1e-7)
    # and the check can fail: a fresh start (no resume) from step 3's data would differ
    assert losses(full.output_dir)[3] != pytest.approx(losses(full.output_dir)[0], rel=1e-3)


def test_hf_export_reloads_with_identical_logits(ray_cluster, tmp_path, tokenizer):
    """The exported model's held-out loss equals the in-engine eval loss of the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayrl.data.batch import collate
    from rayrl.data.sft import load_sft_examples, unpacked_rows
    from rayrl.algorithms import token_logprobs

    result = run_sft(sft_config(tmp_path / "export"))
    engine_loss = [r["eval/loss"] for r in read_metrics(result.output_dir) if "eval/loss" in r][-1]
    model = AutoModelForCausalLM.from_pretrained(result.final_model).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(result.final_model)
    assert reloaded_tokenizer("12+34=")["input_ids"] == tokenizer("12+34=")["input_ids"]
    examples, _ = load_sft_examples("rayrl:addition/sft-eval", reloaded_tokenizer, max_length=16)
    total, count = 0.0, 0
    for i in range(0, 32, 8):
        batch = collate(unpacked_rows(examples[i:i + 8]), reloaded_tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.padding_mask()).logits
        logps = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
        mask = batch.loss_mask[:, 1:]
        total += float(-(logps * mask).sum())
        count += int(mask.sum())
    assert total / count == pytest.approx(engine_loss, rel=1e-6)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "rayrl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_cli_runs_example_end_to_end(tmp_path):
    out = tmp_path / "cli-run"
    proc = run_cli("train", "examples/sft.yaml", f"output_dir={out}", "train.max_steps=4", "train.warmup_steps=1", "eval.every_steps=2",
                   "eval.max_examples=16", "checkpoint.every_steps=2", "trainer.num_cpus=1",
                   "tracking.wandb.mode=offline", "tracking.progress=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 4 and 0.0 <= summary["eval/accuracy"] <= 1.0
    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in steps)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 4]
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()
    assert (out / "checkpoints" / "step-00000002").is_dir()
    assert list((out / "wandb").glob("offline-run-*")), "offline W&B run directory missing"
    assert "sft" in proc.stderr and "step" in proc.stderr  # the progress bar


def test_cli_user_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: sft\ntrain:\n  lr: 1e-3\n  max_step: 5\n")
    proc = run_cli("train", str(bad))
    assert proc.returncode == 2
    assert f"unknown key 'train.max_step' ({bad}:4); did you mean 'train.max_steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
    proc = run_cli("train", "examples/sft.yaml", f"data.train={data}", f"output_dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and f"{data}:2: missing field 'completion'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_and_init_model(tmp_path):
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "init-model" in proc.stdout
    assert "KEY=VALUE" in run_cli("train", "--help").stdout
    proc = run_cli("init-model", str(tmp_path / "m"))
    assert proc.returncode == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "llama"


def test_no_shared_memory_left_behind(ray_cluster, tmp_path):
    """DeepSpeed's CPU allreduce files in /dev/shm are released (they filled the RAM before)."""
    import glob

    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    run_sft(sft_config(tmp_path / "shm", trainer={"world_size": 2}, train={"max_steps": 2}))
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before == set()
