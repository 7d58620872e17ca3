"""The PPO parts of the RL loop: its advantage computation equals the algorithm library's on a
recorded (hand-made) batch; config strictness; reward-model batch balancing."""

import pytest
import torch

from rayrl.algorithms.ppo import AdaptiveKLController, gae_advantages, kl_penalized_rewards
from builtin_configs import build_config
from rayrl.config import ConfigError, policy_settings
from rayrl.rl_advantages import PPOAdvantageSettings, explained_variance, ppo_advantages
from rayrl.rl_roles import balanced_slices


def recorded_batch():
    # 3 completions, T-1 = 6 target positions: prompt positions and right padding are masked out.
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],
                         [0, 1, 1, 1, 1, 1],
                         [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 6, generator=g) * 3 * mask
    ref = -torch.rand(3, 6, generator=g) * 3 * mask
    values = torch.randn(3, 6, generator=g)
    scores = torch.tensor([1.0, -0.5, 2.0])
    return scores, old, ref, values, mask


@pytest.mark.parametrize("whiten", [True, False])
def test_loop_advantages_equal_the_library(whiten):
    scores, old, ref, values, mask = recorded_batch()
    settings = PPOAdvantageSettings(kl_coef=0.1, kl_kind="k1", gamma=0.99, lam=0.9, whiten=whiten)
    advantages, returns, token_rewards = ppo_advantages(scores, old, ref, values, mask, settings)
    expected_rewards = kl_penalized_rewards(scores, old, ref, mask, kl_coef=0.1, kl_kind="k1")
    expected_adv, expected_ret = gae_advantages(expected_rewards, values, mask, gamma=0.99, lam=0.9, whiten=whiten)
    torch.testing.assert_close(token_rewards, expected_rewards)
    torch.testing.assert_close(advantages, expected_adv)
    torch.testing.assert_close(returns, expected_ret)
    assert advantages.shape == (3, 6) and torch.all(advantages[~mask] == 0)
    # the score sits at each row's last completion token, on top of the KL penalty
    assert torch.isclose(token_rewards[0, 4], scores[0] - 0.1 * (old[0, 4] - ref[0, 4]))


def test_kl_in_loss_or_no_reference_leaves_the_scores_alone():
    scores, old, ref, values, mask = recorded_batch()
    plain = kl_penalized_rewards(scores, old, old, mask, kl_coef=0.0)
    for ref_logps, kl_in in ((ref, "loss"), (None, "reward")):
        _, _, token_rewards = ppo_advantages(scores, old, ref_logps, values, mask,
                                             PPOAdvantageSettings(kl_coef=0.3, kl_in=kl_in))
        torch.testing.assert_close(token_rewards, plain)
    assert float(token_rewards.sum()) == pytest.approx(float(scores.sum()))


def test_explained_variance():
    _, _, _, values, mask = recorded_batch()
    assert explained_variance(values, values, mask) == pytest.approx(1.0)
    assert explained_variance(values, values + 1.0, mask) == pytest.approx(1.0)  # a constant offset is explained
    assert explained_variance(torch.zeros_like(values), values, mask) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(5.0, n_steps=10) > 0.1


def test_ppo_config():
    config = build_config({"algorithm": "ppo", "reward_model": {"path": "rm"},
                           "ppo": {"prompts_per_step": 8, "adaptive_kl": True, "kl_in": "loss"},
                           "critic": {"lr": 1e-5, "value_clip": None}, "train": {"micro_batch_size": 4}})
    assert config.rollout.group_size == 1 and config.rewards == []
    # one function decides what the PPO section means for the shared loop: no GRPO-only feature is on
    settings = policy_settings(config)
    assert (settings.section, settings.prompts_per_step, settings.kl_in_loss, settings.kl_kind) == ("ppo", 8, True, "k3")
    assert (settings.ratio_level, settings.dynamic_sampling, settings.max_sampling_rounds) == ("token", False, 1)
    grpo = policy_settings(build_config({"algorithm": "grpo", "grpo": {"ratio_level": "sequence",
                                                                        "dynamic_sampling": True}}))
    assert (grpo.section, grpo.kl_in_loss, grpo.ratio_level, grpo.dynamic_sampling) == ("grpo", True, "sequence", True)
    assert grpo.eps_low == 3e-4  # GSPO's clip range came through
    assert config.sequences_per_optimizer_step == 8 and config.critic_grad_accum_steps == 2
    with pytest.raises(ConfigError, match="ppo.advantage"):  # a GRPO-only key is unknown here
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "ppo": {"advantage": "group"}})
    with pytest.raises(ConfigError, match="critic.valu_clip"):
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "critic": {"valu_clip": 0.1}})
    with pytest.raises(ConfigError, match="reward_model"):
        build_config({"algorithm": "ppo"})
    with pytest.raises(ConfigError, match="critic.world_size"):
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "ppo": {"prompts_per_step": 4},
                      "train": {"micro_batch_size": 4}, "critic": {"world_size": 2}})
    # GRPO keeps its own section and rejects PPO's
    with pytest.raises(ConfigError, match="grpo.gamma"):
        build_config({"algorithm": "grpo", "grpo": {"gamma": 1.0}})


def test_reward_model_batches_are_balanced():
    assert balanced_slices([3, 3, 3, 3], 2) == [(0, 2), (2, 4)]
    assert balanced_slices([10, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert balanced_slices([1, 1], 4) == [(0, 1), (1, 2)]  # never an empty slice
    assert balanced_slices([], 2) == []


def test_critic_peft_config():
    config = build_config({"algorithm": "ppo", "reward_model": {"path": "rm"},
                           "critic": {"peft": {"method": "lora", "r": 4}}})
    assert config.critic.peft.r == 4 and config.model.peft is None
    with pytest.raises(ConfigError, match="critic.peft"):
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "critic": {"peft": {"method": "prefix"}}})
    with pytest.raises(ConfigError, match="critic.peft.rr"):
        build_config({"algorithm": "ppo", "reward_model": {"path": "rm"}, "critic": {"peft": {"rr": 4}}})


def test_lora_critic_trains_its_adapter_and_value_head(tiny_model_dir):
    """critic.peft: only the LoRA matrices and the value head train (all-linear leaves the head to
    modules_to_save), the clipped value loss falls, and the export merges back to a plain value model."""
    from rayrl.actors.critic import apply_value_peft, load_value_model
    from rayrl.algorithms.ppo import clipped_value_loss
    from rayrl.config import PeftConfig

    torch.manual_seed(0)
    model = apply_value_peft(load_value_model(tiny_model_dir), PeftConfig(method="lora", r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable), trainable
    assert any("score.modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("score.lora" in n for n, _ in model.named_parameters())  # no adapter on the head
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20, (8, 10), generator=g)
    mask = torch.zeros(8, 9, dtype=torch.bool)
    mask[:, 4:] = True
    returns = torch.where(ids[:, 1:] % 2 == 0, 1.0, -1.0) * mask  # a value target the model can read off
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(40):
        values = model(input_ids=ids).logits[:, :-1, 0]
        loss, _ = clipped_value_loss(values, values.detach(), returns, mask, clip=None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()  # what export_model writes for export: merged / both
        assert type(merged).__name__.endswith("ForTokenClassification")
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-4)
