"""Reward-model and DPO-family stages, and PEFT, on a real local Ray cluster with DeepSpeed ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rayrl.config import TimeoutConfig, build_config
from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration


def stage_config(algorithm, output_dir, model_path, **sections):
    data = {
        "algorithm": algorithm, "output_dir": str(output_dir), "seed": 0,
        "model": {"path": model_path},
        "data": {"train": "rayrl:addition/prefs-train", "eval": "rayrl:addition/prefs-eval", "max_length": 16},
        "train": {"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-3},
        "trainer": {"world_size": 1, "num_cpus": 0.5},
        "eval": {"max_examples": 16, "at_start": True},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config(data)


def first_step(output_dir):
    return next(r for r in read_metrics(output_dir) if "loss" in r and r["step"] == 1)


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", math.log(2)), ("ipo", 1 / (4 * 0.1 ** 2)), ("hinge", 1.0), ("robust", math.log(2)),
])
def test_dpo_family_loss_at_step_zero(ray_cluster, tmp_path, tiny_model_dir, loss_type, expected):
    """Before any update the policy equals the reference: the known values of each loss."""
    from rayrl.dpo import run_dpo

    settings = {"loss_type": loss_type, "beta": 0.1}
    if loss_type == "robust":
        settings["label_smoothing"] = 0.1
    result = run_dpo(stage_config("dpo", tmp_path / loss_type, tiny_model_dir, dpo=settings,
                                  train={"max_steps": 1}))
    step = first_step(result.output_dir)
    assert step["loss"] == pytest.approx(expected, rel=1e-5)
    assert step["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    evals = [r for r in read_metrics(result.output_dir) if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(expected, rel=1e-5)
    assert evals[-1]["eval/loss"] != pytest.approx(expected, rel=1e-5)  # the step moved the policy
    assert (result.final_model / "model.safetensors").exists()


def test_dpo_alongside_reference_equals_precomputed(ray_cluster, tmp_path, tiny_model_dir):
    from rayrl.dpo import run_dpo

    runs = {mode: run_dpo(stage_config("dpo", tmp_path / mode, tiny_model_dir, dpo={"reference": mode},
                                       train={"max_steps": 3}, eval={"at_start": False}))
            for mode in ("precompute", "alongside")}
    losses = {mode: [r["loss"] for r in read_metrics(run.output_dir) if "loss" in r] for mode, run in runs.items()}
    assert losses["precompute"] == pytest.approx(losses["alongside"], rel=1e-5)
    assert (runs["precompute"].output_dir / "reference_logps.json").exists()


def test_kto_with_unbalanced_labels(ray_cluster, tmp_path, tiny_model_dir):
    from rayrl.dpo import run_dpo

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": i % 4 != 0} for i in range(10, 42)]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_dpo(stage_config("dpo", tmp_path / "kto", tiny_model_dir, dpo={"loss_type": "kto"},
                                  data={"train": str(path), "eval": None}, eval={"at_start": False}))
    step = first_step(result.output_dir)
    assert step["loss"] == pytest.approx(0.5, rel=1e-5)  # 1 - sigmoid(0) with unit weights, z0 = 0
    assert step["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_run(ray_cluster, tmp_path, tiny_model_dir, loss_type):
    from rayrl.dpo import run_dpo

    result = run_dpo(stage_config("dpo", tmp_path / loss_type, tiny_model_dir, dpo={"loss_type": loss_type},
                                  eval={"at_start": False}))
    assert not (result.output_dir / "reference_logps.json").exists()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(result.output_dir) if "loss" in r)


def lora_spec(tiny_model_dir, **peft):
    from rayrl.actors.engine import TrainerSpec
    from rayrl.config import PeftConfig

    return TrainerSpec(model_path=tiny_model_dir, world_size=1, micro_batch_size=4, grad_accum_steps=1,
                       total_steps=10, lr=1e-2, lr_schedule="constant", peft=PeftConfig(**peft))


def test_adapter_disabled_reference_equals_base_model(ray_cluster, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from rayrl.algorithms import token_logprobs
    from rayrl.data.sft import load_sft_examples, sft_step_batcher
    from rayrl.trainer_group import PolicyTrainerGroup

    examples, _ = load_sft_examples("rayrl:addition/sft-train", tokenizer, max_length=16)
    batcher = sft_step_batcher(examples, packing=False, max_length=16, pad_id=tokenizer.pad_token_id,
                               global_batch_size=4, micro_batch_size=4, world_size=1, seed=0, shuffle=False)
    group = PolicyTrainerGroup(lora_spec(tiny_model_dir), num_cpus=0.5, num_gpus=0, timeouts=TimeoutConfig())
    try:
        for step in range(3):  # move the adapter away from its identity start
            batches = batcher.step_batches(step)
            group.train_sft_step(batches, global_num_tokens=sum(b.num_loss_tokens for b in batches[0]))
        batch = batcher.step_batches(10)[0][0]
        reference = group.sequence_logprobs([batch], reference=True)
        policy = group.sequence_logprobs([batch], reference=False)
    finally:
        group.shutdown()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = base(input_ids=batch.input_ids, attention_mask=batch.padding_mask()).logits
    logps = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
    expected = torch.where(batch.loss_mask[:, 1:], logps, torch.zeros_like(logps)).sum(-1)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter did change the policy


def test_lora_plus_gives_b_matrices_their_own_learning_rate(ray_cluster, tiny_model_dir):
    from rayrl.trainer_group import PolicyTrainerGroup

    group = PolicyTrainerGroup(lora_spec(tiny_model_dir, lora_plus_ratio=16.0), num_cpus=0.5, num_gpus=0,
                               timeouts=TimeoutConfig())
    try:
        groups = group.param_group_lrs()
    finally:
        group.shutdown()
    b_groups = [g for g in groups if g["params"] and all("lora_B" in n for n in g["params"])]
    other = [g for g in groups if g["params"] and not any("lora_B" in n for n in g["params"])]
    assert len(b_groups) == 1 and other
    assert all(b_groups[0]["lr"] == pytest.approx(16 * g["lr"]) for g in other)
    assert all("lora_A" in n for g in other for n in g["params"])  # only adapters train


@pytest.mark.parametrize("method", ["dora", "prefix", "prompt"])
def test_peft_methods_train_through_sft(ray_cluster, tmp_path, tiny_model_dir, method):
    from rayrl.sft import run_sft

    config = build_config({
        "algorithm": "sft", "output_dir": str(tmp_path / method), "model": {"path": tiny_model_dir, "peft": {"method": method}},
        "data": {"train": "rayrl:addition/sft-train", "max_length": 16, "eval": "rayrl:addition/sft-eval"},
        "train": {"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 8, "lr": 1e-2},
        "trainer": {"num_cpus": 0.5}, "eval": {"max_examples": 8, "at_start": False},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    })
    result = run_sft(config)
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    if method == "dora":
        assert steps[-1]["loss"] < steps[0]["loss"]
    from peft import AutoPeftModelForCausalLM

    adapter_dir = result.final_model / "adapter" if method == "dora" else result.final_model
    assert (adapter_dir / "adapter_config.json").exists()
    AutoPeftModelForCausalLM.from_pretrained(adapter_dir)  # the adapter reloads


def test_lora_dpo_merged_export_loads_in_vllm(ray_cluster, tmp_path, tiny_model_dir):
    from rayrl.dpo import run_dpo

    result = run_dpo(stage_config("dpo", tmp_path / "lora", tiny_model_dir, model={"path": tiny_model_dir, "peft": {"method": "lora"}},
                                  eval={"at_start": False}))
    merged = result.final_model
    assert (merged / "model.safetensors").exists() and (merged / "adapter" / "adapter_config.json").exists()
    script = textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({str(merged)!r}, dtype="float32", enforce_eager=True, max_model_len=64, seed=0)
            out = llm.generate(["12+34="], SamplingParams(max_tokens=4, temperature=0))
            print("GENERATED", len(out[0].outputs[0].token_ids))
    """)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "GENERATED" in proc.stdout, proc.stderr[-3000:]
    assert int(proc.stdout.split("GENERATED")[1].split()[0]) > 0


def test_reward_model_stage_exports_a_sequence_classifier(ray_cluster, tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from rayrl.data.preference import collate_pairs, load_preference_pairs
    from rayrl.rm import run_rm

    result = run_rm(stage_config("rm", tmp_path / "rm", tiny_model_dir, train={"max_steps": 3}))
    rows = read_metrics(result.output_dir)
    first = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    assert {"loss", "accuracy", "rewards/margins", "grad_norm", "lr"} <= set(first)
    final_eval = [r for r in rows if "eval/accuracy" in r][-1]
    model = AutoModelForSequenceClassification.from_pretrained(result.final_model).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    pairs, _ = load_preference_pairs("rayrl:addition/prefs-eval", tokenizer, max_length=16)
    batch = collate_pairs(pairs[:16], tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = model(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.padding_mask()).logits[:, 0]
    accuracy = float((rewards[:16] > rewards[16:]).float().mean())
    assert accuracy == pytest.approx(final_eval["eval/accuracy"], abs=1e-6)  # reloaded model == trained one
