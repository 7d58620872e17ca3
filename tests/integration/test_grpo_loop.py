"""The GRPO loop on a real local Ray cluster: vLLM-CPU rollout workers, DeepSpeed trainer ranks,
a verifier pool, weight sync into the running engine, both placements."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rayrl.config import TimeoutConfig, build_config
from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration


def grpo_config(output_dir, model_path, **sections):
    data = {
        "algorithm": "grpo", "output_dir": str(output_dir), "seed": 0, "model": {"path": model_path},
        "data": {"train": "rayrl:addition/prompts-train", "eval": "rayrl:addition/prompts-eval"},
        "rollout": {"backend": "vllm", "num_cpus": 0.25, "group_size": 4, "max_new_tokens": 4, "kv_cache_gib": 0.25},
        "grpo": {"prompts_per_step": 4},
        "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-3},
        "trainer": {"world_size": 2, "num_cpus": 0.25},
        "verifier": {"num_workers": 2, "num_cpus": 0.1},
        "eval": {"max_examples": 8, "max_new_tokens": 4},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config(data)


REQUIRED = {"loss", "grad_norm", "lr", "reward/mean", "reward/std", "reward/correct/mean", "reward/correct/std",
            "accuracy", "clip_frac", "clip_frac/low", "clip_frac/high", "entropy",
            "completion/length_mean", "completion/truncated_frac", "groups/zero_variance_frac",
            "logprob_gap/sampler_trainer", "policy_version", "time/generate", "time/reward", "time/reference",
            "time/train", "time/sync", "tokens_per_s"}


@pytest.mark.parametrize("placement", ["split", "colocated"])
def test_grpo_runs_in_both_layouts(ray_cluster, tmp_path, tiny_model_dir, placement):
    from rayrl.rl import run_rl

    extra = {"kl_coef": 0.05} if placement == "split" else {}
    passk = {"samples": 4} if placement == "split" else {}
    # Split samples at T=0.7: the trainer's and reference's log-probs must be taken at the same T.
    temperature = 0.7 if placement == "split" else 1.0
    # Split packs its forwards, in micro-batches of at most 40 tokens (several per rank, of ~13-token rows)
    packing = ({"train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-3, "packing": True,
                          "max_tokens_per_micro_batch": 40}, "data": {"max_prompt_length": 16}}
               if placement == "split" else {})
    result = run_rl(grpo_config(tmp_path / placement, tiny_model_dir, placement=placement,
                                  grpo={"prompts_per_step": 4, **extra}, eval=passk,
                                  rollout={"num_workers": 2, "temperature": temperature}, **packing))
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert [r["policy_version"] for r in steps] == [1, 2]
    assert all(REQUIRED <= set(r) for r in steps)
    if extra:
        assert all("kl" in r for r in steps)
        # step 1 trains the reference's own weights: zero KL, if both sides use the sampling temperature
        assert steps[0]["kl"] < 1e-6
    # sampler (vLLM) and trainer (DeepSpeed) agree on the sampled tokens' log-probs after every sync (split:
    # the trainer's from its packed forward)
    assert all(r["logprob_gap/sampler_trainer"] < 1e-3 for r in steps)
    assert (result.final_model / "model.safetensors").exists()
    evals = [r for r in read_metrics(result.output_dir) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    if passk:  # pass@k of 4 sampled completions per eval prompt, next to greedy accuracy
        assert all(0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= 1 for r in evals)


def test_post_sync_engine_logprobs_match_trainer(ray_cluster, tiny_model_dir, tokenizer):
    """Train the DeepSpeed policy (2 ranks), push its weights into the running vLLM engine: the engine's
    log-probs of a fixed sequence then match the trainer's; before the push they do not."""
    import ray

    from rayrl.actors.engine import TrainerSpec
    from rayrl.actors.rollout_worker import RolloutWorker
    from rayrl.data.rollout import completion_tokens
    from rayrl.data.sft import load_sft_examples, sft_step_batcher
    from rayrl.trainer_group import PolicyTrainerGroup

    spec = TrainerSpec(model_path=tiny_model_dir, world_size=2, micro_batch_size=8, grad_accum_steps=1,
                       total_steps=5, lr=1e-2, lr_schedule="constant")
    trainers = PolicyTrainerGroup(spec, num_cpus=0.25, num_gpus=0, timeouts=TimeoutConfig())
    worker = ray.remote(RolloutWorker).options(num_cpus=0.25).remote(tiny_model_dir, backend="vllm", kv_cache_gib=0.25)
    try:
        examples, _ = load_sft_examples("rayrl:addition/sft-train", tokenizer, max_length=16)
        batcher = sft_step_batcher(examples, packing=False, max_length=16, pad_id=tokenizer.pad_token_id,
                                   global_batch_size=16, micro_batch_size=8, world_size=2, seed=0, shuffle=True)
        for step in range(3):
            batches = batcher.step_batches(step)
            trainers.train_sft_step(batches, global_num_tokens=sum(b.num_loss_tokens for r in batches for b in r))
        prompt = tokenizer("37+45=")["input_ids"]
        completion = tokenizer("82")["input_ids"] + [tokenizer.eos_token_id]
        tokens, _ = completion_tokens([prompt], [completion], [[0.0] * len(completion)], tokenizer.pad_token_id)
        trainer_logps = trainers.token_logprobs(tokens, micro_batch_size=1)[0, len(prompt) - 1:]  # rank 1: padding
        # Data-parallel: each rank its shard of three rows of different lengths, stitched back in order.
        rows = [tokenizer(text)["input_ids"] for text in ("1+2=", "37+45=", "100+200=")]
        three, _ = completion_tokens(rows, [completion] * 3, [[0.0] * len(completion)] * 3, tokenizer.pad_token_id)
        sharded = trainers.token_logprobs(three, micro_batch_size=1)
        mask = three.loss_mask[:, 1:]
        torch.testing.assert_close(sharded * mask, trainers.token_logprobs(three, micro_batch_size=3) * mask)
        torch.testing.assert_close(sharded[1, len(prompt) - 1:len(prompt) - 1 + len(completion)], trainer_logps[:len(completion)])

        def engine_logps():
            return torch.tensor(ray.get(worker.sequence_logprobs.remote([prompt + completion], [len(prompt)]))[0])

        before = engine_logps()
        assert not torch.allclose(before, trainer_logps, atol=1e-3)  # the check can fail
        exported = trainers.export_weight_buckets(1 << 20)
        stats = ray.get(worker.update_weights.remote(1, exported.refs, exported.checksums), timeout=120)
        assert stats.version == 1 and stats.num_buckets >= 2  # bucketed, not one call per tensor
        torch.testing.assert_close(engine_logps(), trainer_logps, atol=1e-4, rtol=1e-4)
        check_sync_guard(trainers, worker, exported, tokenizer)
    finally:
        ray.kill(worker)
        trainers.shutdown()


def test_a_packed_token_budget_step_on_deepspeed_equals_the_padded_step(ray_cluster, tiny_model_dir, tokenizer):
    """train.packing on 2 real DeepSpeed ranks: each rank packs its rows, and takes as many micro-batches as
    the token budget cut (more than the one its DeepSpeed config counts), with the optimizer step at the
    last. The loss, and the weights after the step, are the padded step's."""
    from dataclasses import replace

    from rayrl.actors.engine import TrainerSpec
    from rayrl.data.rollout import RolloutBatch, completion_tokens
    from rayrl.objectives import PolicyGradientObjective
    from rayrl.rl import MicroBatching, UpdatePlan, train_on_rollout
    from rayrl.trainer_group import PolicyTrainerGroup

    prompts = [tokenizer(f"{a}+{a + 7}=")["input_ids"] for a in range(3, 11)]
    completions = [tokenizer("9" * n)["input_ids"][:n] for n in (1, 12, 3, 9, 2, 14, 5, 7)]
    tokens, sampler = completion_tokens(prompts, completions, [[0.0] * len(c) for c in completions],
                                        tokenizer.pad_token_id)
    batch = RolloutBatch(tokens, torch.linspace(-1, 1, 8), None, sampler, None, torch.zeros(8, dtype=torch.bool))
    budget = MicroBatching(4, max_tokens=24)
    rows = torch.arange(8)
    assert all(len(rank) >= 3 for rank in budget.split(rows, tokens.row_lengths(), 2))
    spec = TrainerSpec(model_path=tiny_model_dir, world_size=2, micro_batch_size=4, grad_accum_steps=1,
                       total_steps=2, lr=1e-3, lr_schedule="constant")
    mask = tokens.loss_mask[:, 1:]
    results = {}
    for packing, micro_batching in [(False, MicroBatching(4)), (True, budget)]:
        group = PolicyTrainerGroup(replace(spec, packing=packing), num_cpus=0.25, num_gpus=0, timeouts=TimeoutConfig())
        try:
            before = group.token_logprobs(tokens, micro_batch_size=8)
            metrics = train_on_rollout(UpdatePlan(1, 1, 8, 2, micro_batching, 0), group, PolicyGradientObjective(),
                                       batch, 0)
            results[packing] = (before, metrics, group.token_logprobs(tokens, micro_batch_size=8))
        finally:
            group.shutdown()
    (before, padded, padded_after), (packed_before, packed, packed_after) = results[False], results[True]
    torch.testing.assert_close(packed_before * mask, before * mask, atol=1e-5, rtol=1e-5)
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-6)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    assert ((padded_after - before).abs() * mask).max() > 1e-3  # the step changed the weights
    torch.testing.assert_close(packed_after * mask, padded_after * mask, atol=1e-4, rtol=1e-4)


def check_sync_guard(trainers, worker, exported, tokenizer):
    """The weight-sync guard on the real trainer and engine: a push damaged in transit is caught by
    its checksum and pushed again; damaged twice, the run stops naming the tensor and the worker. An
    engine serving other weights than the trainer's fails the probe check until a re-push fixes it."""
    import numpy as np
    import ray

    from rayrl.data.rollout import PromptRow
    from rayrl.recovery import RestartingActors
    from rayrl.rl_roles import RolloutPool
    from rayrl.sync_guard import ProbeBatch, SyncGuard
    from rayrl.weight_sync import WeightPusher, WeightSyncError

    pool = RolloutPool(RestartingActors("rollout", lambda i: worker, 1, max_restarts=0, startup_s=60, setting="-"),
                       TimeoutConfig())
    pusher = WeightPusher("object_store", trainers.actors, pool.workers, worker_who=pool.who, bucket_bytes=1 << 20)
    probe = ProbeBatch.from_prompts([PromptRow("p", tokenizer("37+45=82")["input_ids"], {})], 2)
    guard = SyncGuard(probe, tolerance=0.01, every=1, trainers=trainers, rollout=pool,
                      pad_id=tokenizer.pad_token_id, deadline_s=60)
    assert guard.check(1, repush=lambda: None)["sync/verify_max_abs_diff"] < 1e-4

    ray.get(worker.damage_next_pushes_for_test.remote(1), timeout=120)
    pusher.push(2)  # damaged once: caught by the checksum, pushed again
    assert ray.get(worker.policy_version.remote(), timeout=60) == 2
    ray.get(worker.damage_next_pushes_for_test.remote(2), timeout=120)
    with pytest.raises(WeightSyncError, match=r"rollout\[0\] \(pid \d+.*tensor '.*' \(bucket 0\) arrived corrupted"):
        pusher.push(3)
    assert ray.get(worker.policy_version.remote(), timeout=60) == 2  # the engine kept its weights

    # An engine that serves something else (one tensor zeroed behind the trainer's back)
    name, array = next(iter(ray.get(exported.refs[0], timeout=120).items()))
    ray.get(worker.update_weights.remote(3, [{name: np.zeros_like(array)}]), timeout=120)
    with pytest.raises(WeightSyncError, match=r"rollout\[0\].*differ from the trainer's by up to"):
        guard.check(3, repush=lambda: None)
    repaired = guard.check(3, repush=lambda: pusher.push(3))  # one re-push, then it agrees
    assert repaired["sync/verify_max_abs_diff"] < 1e-4


def test_user_reward_file_and_failing_reward_function(ray_cluster, tmp_path, tiny_model_dir):
    """A user's JSONL of prompts with `answer` and a reward function in their own file; functions that
    raise, hang past their timeout or kill their own process on some rows give counted failures and
    their fallback, not a crash; one that returns None is excluded on request."""
    from rayrl.rl import run_rl

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(10, 40)))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "def starts_right(prompt, completion, answer, **fields):\n"
        "    return float(completion.strip()[:1] == answer[:1])\n\n"
        "def flaky(prompt, completion, answer, **fields):\n"
        "    if int(answer) % 2:\n"
        "        raise RuntimeError('boom')\n"
        "    return 1.0\n\n"
        "def tens_only(prompt, completion, answer, **fields):\n"
        "    return None if int(answer) >= 20 else float(completion.strip() == answer)\n\n"
        "def hangs(prompt, completion, answer, **fields):\n"
        "    if sum(map(ord, completion)) % 3 == 0:\n"
        "        import time; time.sleep(60)\n"
        "    return 0.0\n\n"
        "def exits(prompt, completion, answer, **fields):\n"
        "    if sum(map(ord, completion)) % 3 == 1:\n"
        "        import os; os._exit(3)\n"
        "    return 0.0\n")
    config = grpo_config(tmp_path / "user", tiny_model_dir, data={"train": str(data), "eval": str(data)},
                         rewards=[{"fn": f"{rewards}:starts_right", "name": "right"},
                                  {"fn": f"{rewards}:flaky", "name": "flaky", "weight": 0.5, "fallback": -1.0},
                                  {"fn": f"{rewards}:tens_only", "name": "tens", "on_failure": "exclude"},
                                  {"fn": f"{rewards}:hangs", "timeout_s": 0.5}, {"fn": f"{rewards}:exits"}],
                         trainer={"world_size": 1, "num_cpus": 0.5})
    result = run_rl(config)
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert len(steps) == 2
    for row in steps:
        assert 0 < row["reward/flaky/failure_rate"] < 1  # odd answers raised: counted, fell back
        assert row["reward/flaky/mean"] < 1.0
        assert math.isfinite(row["loss"])
        # None ("does not apply") is not a failure; on_failure: exclude leaves those completions out
        assert row["reward/tens/failure_rate"] == 0
        assert row["reward/tens/not_applicable_rate"] == row["reward/excluded_frac"] > 0
        # a function that hangs past its timeout, and one that kills its own process: counted, not fatal
        assert 0 < row["reward/hangs/timeout_rate"] == row["reward/hangs/failure_rate"] < 1
        assert 0 < row["reward/exits/failure_rate"] < 1 and row["reward/exits/timeout_rate"] == 0


def test_a_call_past_its_deadline_stops_the_run_naming_the_role(ray_cluster, tmp_path, tiny_model_dir):
    """fault.timeouts through the config: a generate call that cannot finish in its deadline stops the
    run with an error naming the rollout worker, what it was doing, the key, and its Python stack."""
    from rayrl.remote import RemoteCallTimeout
    from rayrl.rl import run_rl

    config = grpo_config(tmp_path / "late", tiny_model_dir, rollout={"backend": "hf"},
                         trainer={"world_size": 1, "num_cpus": 0.5}, eval={"at_start": False},
                         fault={"timeouts": {"generate_s": 0.001, "generate_per_token_s": 0.0}, "max_restarts": 0})
    with pytest.raises(RemoteCallTimeout) as error:
        run_rl(config)
    message = str(error.value)
    assert "rollout[0] (pid " in message and "did not answer within 0.001 s while generating" in message
    assert "fault.timeouts.generate_s" in message and "is at:" in message


def test_bad_reward_spec_fails_before_work(tmp_path, tiny_model_dir):
    from rayrl.config import ConfigError
    from rayrl.rl import run_rl

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run: left where it is
    config = grpo_config(tmp_path / "bad", tiny_model_dir,
                         rewards=[{"fn": "math_answer"}, {"fn": str(tmp_path / "nope.py") + ":fn"}])
    with pytest.raises(ConfigError, match=r"rewards\[1\].fn: reward function .*nope.py.*file not found"):
        run_rl(config)
    assert (tmp_path / "bad" / "metrics.jsonl").exists() and not (tmp_path / "bad" / "earlier_runs").exists()


def test_reward_rises_on_an_easy_task(ray_cluster, tmp_path, tiny_model_dir):
    """From random weights: reward 1 when the completion starts with a digit (~10% by chance)."""
    from rayrl.rl import run_rl

    rewards = tmp_path / "easy.py"
    rewards.write_text("def digit_first(prompt, completion, **fields):\n    return float(completion[:1].isdigit())\n")
    config = grpo_config(tmp_path / "easy", tiny_model_dir, rewards=[{"fn": f"{rewards}:digit_first", "name": "digit"}],
                         rollout={"group_size": 8, "max_new_tokens": 2}, grpo={"prompts_per_step": 8},
                         train={"max_steps": 8, "micro_batch_size": 64, "lr": 1e-2},
                         trainer={"world_size": 1, "num_cpus": 0.5}, eval={"at_start": False, "every_steps": 0})
    result = run_rl(config)
    rewards_seen = [r["reward/mean"] for r in read_metrics(result.output_dir) if "reward/mean" in r]
    assert len(rewards_seen) == 8
    assert sum(rewards_seen[-2:]) / 2 > sum(rewards_seen[:2]) / 2 + 0.4, rewards_seen


@pytest.mark.parametrize("variant", [
    {"grpo": {"eps_high": 0.28, "dynamic_sampling": True, "overlong_filter": True, "overlong_buffer": 2}},  # DAPO
    {"grpo": {"ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4, "loss_aggregation": "seq_mean_token_mean"}},  # GSPO
    {"grpo": {"scale": "none", "loss_aggregation": "seq_mean_token_sum_norm", "mini_batches": 2, "tis_cap": 2.0}},  # Dr. GRPO
    {"grpo": {"advantage": "rloo", "epochs": 2}},
    {"grpo": {"advantage": "reinforce_pp"}, "rollout": {"backend": "hf"}},
], ids=["dapo", "gspo", "dr_grpo", "rloo", "reinforce_pp_hf"])
def test_grpo_variants_run(ray_cluster, tmp_path, tiny_model_dir, variant):
    from rayrl.rl import run_rl

    sections = {"trainer": {"world_size": 1, "num_cpus": 0.5}, "eval": {"at_start": False, "every_steps": 0},
                "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-3}}
    for key, value in variant.items():
        sections[key] = {**sections.get(key, {}), **value}
    result = run_rl(grpo_config(tmp_path / "variant", tiny_model_dir, **sections))
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    if variant["grpo"].get("dynamic_sampling"):
        assert all("groups/unfilled" in r and "reward/overlong_penalty/mean" in r for r in steps)


def test_grpo_with_lora_pushes_only_the_adapter(ray_cluster, tmp_path, tiny_model_dir):
    """rollout.lora_sync: adapter through the config: the engine serves the base weights and each push
    carries the LoRA adapter alone; the engine's log-probs of the sampled tokens equal the trainer's after
    every push (the gap and the sync guard's probe), so the adapter it serves is the trained one."""
    from pathlib import Path

    from rayrl.rl import run_rl

    rewards = tmp_path / "easy.py"  # varies within groups from the start: the adapter learns from step 1
    rewards.write_text("def digit_first(prompt, completion, **fields):\n    return float(completion[:1].isdigit())\n")
    config = grpo_config(tmp_path / "lora", tiny_model_dir, model={"peft": {"method": "lora", "r": 8}},
                         rewards=[{"fn": f"{rewards}:digit_first", "name": "digit"}],
                         rollout={"lora_sync": "adapter", "group_size": 8}, grpo={"prompts_per_step": 4}, train={"max_steps": 3, "micro_batch_size": 8, "lr": 1e-2},
                         trainer={"world_size": 1, "num_cpus": 0.5}, eval={"at_start": False, "every_steps": 0})
    result = run_rl(config)
    steps = [r for r in read_metrics(result.output_dir) if "loss" in r]
    model_bytes = (Path(tiny_model_dir) / "model.safetensors").stat().st_size
    assert len(steps) == 3
    assert all(0 < r["sync/bytes"] < model_bytes / 5 for r in steps)
    assert all(r["logprob_gap/sampler_trainer"] < 1e-3 for r in steps[1:])  # sampled after a push
    assert steps[-1]["sync/verify_max_abs_diff"] < 1e-3
    from safetensors.torch import load_file

    adapter = load_file(result.final_model / "adapter" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in adapter.items())


def test_roles_that_do_not_fit_the_cluster_fail_before_work(ray_cluster, tmp_path, tiny_model_dir):
    from rayrl.config import ConfigError
    from rayrl.rl import run_rl

    config = grpo_config(tmp_path / "big", tiny_model_dir, trainer={"world_size": 2, "num_cpus": 1.5})
    with pytest.raises(ConfigError, match=r"the roles need 3.45 CPUs \(trainer 3, rollout 0.25, verifier 0.2\) but the Ray cluster has 2"):
        run_rl(config)
    assert not (tmp_path / "big" / "metrics.jsonl").exists()
