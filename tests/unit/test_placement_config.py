"""Custom Ray resources that pin roles to node groups: accepted with a cluster address, refused with
a named key otherwise."""

from __future__ import annotations

import pytest

from rayrl.config import ConfigError, build_config


def test_custom_resources_need_a_cluster_and_name_the_key():
    ok = build_config({"algorithm": "grpo", "ray": {"address": "auto"},
                       "trainer": {"resources": {"train_gpu": 1}}, "rollout": {"resources": {"rollout_gpu": 1}}})
    assert ok.rollout.resources == {"rollout_gpu": 1}
    with pytest.raises(ConfigError, match="rollout.resources .*set ray.address"):
        build_config({"algorithm": "grpo", "rollout": {"resources": {"rollout_gpu": 1}}})
    with pytest.raises(ConfigError, match=r"trainer.resources: \['GPU'\]"):
        build_config({"algorithm": "sft", "ray": {"address": "auto"}, "trainer": {"resources": {"GPU": 1}}})
    with pytest.raises(ConfigError, match="positive"):
        build_config({"algorithm": "sft", "ray": {"address": "auto"}, "trainer": {"resources": {"x": 0}}})
