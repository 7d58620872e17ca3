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


def test_default_cpu_requests_are_fitted_to_the_machine_and_set_ones_kept():
    from rayrl.rl_roles import fit_unset_cpus, role_resources

    def total(config):
        return sum(cpus for cpus, _ in role_resources(config).values())

    defaults = build_config({"algorithm": "grpo", "grpo": {"kl_coef": 0.05}})  # trainer, rollout, verifier, reference
    assert total(defaults) > 2
    fitted, said = fit_unset_cpus(defaults, 2)
    assert total(fitted) <= 2 and fitted.trainer.num_cpus > 0 and fitted.rollout.num_cpus > 0
    assert "trainer.num_cpus 1 -> " in said and "exceed this machine's 2 CPUs" in said
    assert fitted.rollout.group_size == defaults.rollout.group_size  # nothing else changed

    chosen = build_config({"algorithm": "grpo", "trainer": {"num_cpus": 1.5}})
    fitted, said = fit_unset_cpus(chosen, 2)
    assert fitted.trainer.num_cpus == 1.5 and total(fitted) <= 2 and "trainer" not in said

    assert fit_unset_cpus(defaults, 16) == (defaults, None)  # fits: untouched
    every = build_config({"algorithm": "grpo", "trainer": {"num_cpus": 2}, "rollout": {"num_cpus": 1},
                          "verifier": {"num_cpus": 0.25}})
    assert fit_unset_cpus(every, 2) == (every, None)  # all chosen: the cluster check names what does not fit
