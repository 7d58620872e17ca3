"""`rayrl pipeline`: stages chain through model.path; a rerun skips the finished stages."""

import json

import pytest

from rayrl.config import ConfigError
from rayrl.pipeline import DONE_MARKER, plan_pipeline, run_pipeline
from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration

SMALL = ["train.max_steps=2", "train.warmup_steps=0", "eval.at_start=false", "eval.every_steps=0",
         "eval.max_examples=8", "trainer.num_cpus=0.5", "tracking.progress=false", "tracking.wandb.mode=disabled",
         "checkpoint.every_steps=0"]


def write_pipeline(tmp_path, stages):
    path = tmp_path / "pipeline.yaml"
    lines = [f"output_dir: {tmp_path / 'out'}", "stages:"]
    for name, config, overrides in stages:
        lines += [f"  - name: {name}", f"    config: {config}", f"    overrides: {json.dumps(overrides)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pipeline_chains_and_skips_finished_stages(ray_cluster, tmp_path, tiny_model_dir, monkeypatch):
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    sft = ("sft", str(repo / "examples/sft.yaml"), [f"model.path={tiny_model_dir}", "train.global_batch_size=16",
                                                   "train.micro_batch_size=16"])
    dpo = ("dpo", str(repo / "examples/dpo.yaml"), ["train.global_batch_size=8", "train.micro_batch_size=8"])
    path = write_pipeline(tmp_path, [sft, dpo])
    planned = plan_pipeline(path, SMALL)
    assert planned[1].config.model.path == str(tmp_path / "out" / "sft" / "final")  # chained

    first = run_pipeline(path, SMALL)
    assert [s["skipped"] for s in first] == [False, False]
    assert (tmp_path / "out" / "dpo" / DONE_MARKER).exists()
    dpo_metrics = (tmp_path / "out" / "dpo" / "metrics.jsonl").read_text()

    # "resumed after its second stage": a third stage is added; the two finished ones are skipped
    grpo = ("grpo", str(repo / "examples/grpo.yaml"), ["rollout.num_cpus=0.25", "grpo.prompts_per_step=4",
                                                      "rollout.group_size=2", "train.micro_batch_size=8",
                                                      "rollout.kv_cache_gib=0.25"])
    path = write_pipeline(tmp_path, [sft, dpo, grpo])
    second = run_pipeline(path, SMALL)
    assert [s["skipped"] for s in second] == [True, True, False]
    assert (tmp_path / "out" / "dpo" / "metrics.jsonl").read_text() == dpo_metrics  # untouched
    assert len([r for r in read_metrics(tmp_path / "out" / "grpo") if "loss" in r]) == 2


def test_pipeline_validates_every_stage_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: dpo\ndpo:\n  betta: 0.1\n")
    path = write_pipeline(tmp_path, [("sft", "examples/sft.yaml", []), ("dpo", str(bad), [])])
    with pytest.raises(ConfigError, match=r"(?s)pipeline stage 'dpo'.*unknown key 'dpo.betta'.*did you mean 'dpo.beta'"):
        plan_pipeline(path)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_rlhf_pipeline_wires_named_stages(tmp_path):
    """base -> SFT -> RM -> PPO: PPO's policy comes from the sft stage (model_from), its reward model
    from the rm stage ({stage:rm}); references to stages that do not come earlier are refused."""
    import yaml

    out = tmp_path / "out"
    stages = [{"name": "sft", "config": "examples/sft.yaml"}, {"name": "rm", "config": "examples/rm.yaml"},
              {"name": "ppo", "config": "examples/ppo.yaml", "model_from": "sft",
               "overrides": ["reward_model.path={stage:rm}"]}]
    path = tmp_path / "rlhf.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": stages}))
    sft, rm, ppo = plan_pipeline(path)
    assert rm.config.model.path == str(out / "sft" / "final")
    assert ppo.config.model.path == str(out / "sft" / "final")
    assert ppo.config.reward_model.path == str(out / "rm" / "final")

    stages[2]["model_from"] = "ppo"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": stages}))
    with pytest.raises(ConfigError, match=r"stages\[2\]: model_from 'ppo' is not an earlier stage"):
        plan_pipeline(path)
    stages[2]["model_from"] = "sft"
    stages[2]["overrides"] = ["reward_model.path={stage:reward}"]
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": stages}))
    with pytest.raises(ConfigError, match=r"names stage 'reward', which is not an earlier stage"):
        plan_pipeline(path)
