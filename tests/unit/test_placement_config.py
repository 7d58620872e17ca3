"""Custom Ray resources that pin roles to node groups: accepted with a cluster address, refused with
a named key otherwise."""

from __future__ import annotations

import pytest

from builtin_configs import build_config
from rayrl.config import ConfigError


def test_custom_resources_need_a_cluster_and_name_the_key():
    ok = build_config({"algorithm": "grpo", "ray": {"address": "auto"},
                       "trainer": {"resources": {"train_gpu": 1}}, "rollout": {"resources": {"rollout_gpu": 1}}})
    assert ok.rollout.resources == {"rollout_gpu": 1}
    with pytest.raises(ConfigError, match="rollout.resources .*set ray.address"):
        build_config({"algorithm": "grpo", "rollout": {"resources": {"rollout_gpu": 1}}})
    with pytest.raises(ConfigError, match=r"trainer.resources: \['GPU'\]"):
        build_config({"algorithm": "sft", "ray": {"address": "auto"}, "trainer": {"resources": {"GPU": 1}}})
    for section in ("verifier", "reference"):
        with pytest.raises(ConfigError, match=rf"{section}.resources .*set ray.address"):
            build_config({"algorithm": "grpo", section: {"resources": {"cpu_pool": 1}}})
    pinned = build_config({"algorithm": "ppo", "ray": {"address": "auto"},
                           "reward_model": {"path": "rm", "resources": {"rm_gpu": 1}}})
    assert pinned.reward_model.resources == {"rm_gpu": 1}
    with pytest.raises(ConfigError, match="positive"):
        build_config({"algorithm": "sft", "ray": {"address": "auto"}, "trainer": {"resources": {"x": 0}}})


def test_colocated_rollout_reserves_a_share_in_every_trainer_bundle():
    from rayrl.rl_roles import role_resources

    base = {"algorithm": "grpo", "trainer": {"world_size": 4, "num_cpus": 1},
            "rollout": {"num_workers": 2, "num_cpus": 0.5}, "train": {"micro_batch_size": 4}}
    split = build_config(base)
    colocated = build_config({**base, "placement": "colocated"})
    assert role_resources(split)["rollout"] == (1.0, 0.0)
    assert role_resources(colocated)["rollout"] == (2.0, 0.0)  # 4 bundles x 0.5, 2 of them idle
    with pytest.raises(ConfigError, match=r"rollout.num_workers \(5\) must be <= trainer.world_size \(4\)"):
        build_config({**base, "placement": "colocated", "rollout": {"num_workers": 5}})
