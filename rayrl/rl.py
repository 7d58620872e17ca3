"""The GRPO family on Ray: rollout workers (vLLM), verifiers, a reference model and a DeepSpeed
policy trainer, driven by one loop.

Each step:
  1. generate   prompts_per_step prompts x group_size samples on the rollout workers
  2. score      the verifier pool (rule-based rewards, user functions; failures fall back, counted)
  3. log-probs  the trainer's (the ratio's denominator) and, with a KL term, the reference's
  4. advantage  group-normalised (GRPO / Dr. GRPO), leave-one-out (RLOO) or whitened (REINFORCE++)
  5. train      mini_batches x epochs optimizer steps of the clipped policy-gradient loss
  6. sync       the new weights, bucketed, into the running engines (policy version + 1)
  7. log, eval, checkpoint

Departures from the papers: rewards are per sequence (outcome supervision); DAPO's dynamic sampling
tops a batch up with fresh prompts for at most ``max_sampling_rounds`` rounds, then keeps the
zero-variance groups it has (their advantage is 0) so that every step has the same size.

Run:  rayrl train examples/grpo.yaml [key=value ...]
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from rayrl.actors.engine import TrainerSpec
from rayrl.actors.policy_trainer import PolicyGradientObjective
from rayrl.actors.reference_model import ReferenceModel
from rayrl.actors.rollout_worker import Completion, RolloutWorker, SamplingSettings
from rayrl.actors.verifier import Verifier
from rayrl.algorithms import group_advantages, masked_whiten, rloo_advantages
from rayrl.cluster import ray_session
from rayrl.config import GRPOConfig, config_to_dict
from rayrl.data.batching import StepBatcher
from rayrl.data.rollout import PromptRow, RolloutBatch, completion_tokens, load_prompts
from rayrl.outputs import export_final_model
from rayrl.rewards.scoring import RewardScorer, RewardSpec, ScoreResult
from rayrl.stage_common import StageResult, checkpoint_due, eval_due, prepare_stage
from rayrl.tracking import Tracker
from rayrl.trainer_group import TrainerGroup

SYNC_BUCKET_BYTES = 64 << 20


class RolloutPool:
    """Rollout workers; prompts are handed out in chunks to whichever worker is free (balanced by
    pending work), and weights are pushed to all of them."""

    def __init__(self, workers: list):
        self.workers = workers

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        import ray

        chunk = max(1, -(-len(prompt_ids) // (2 * len(self.workers))))
        chunks = [(start, prompt_ids[start:start + chunk]) for start in range(0, len(prompt_ids), chunk)]
        pending: dict[Any, tuple[int, Any]] = {}
        results: list[Completion] = []
        idle = list(self.workers)
        while chunks or pending:
            while chunks and idle:
                start, prompts = chunks.pop(0)
                worker = idle.pop()
                seeded = replace(sampling, seed=None if sampling.seed is None else sampling.seed + start)
                pending[worker.generate.remote(prompts, seeded)] = (start, worker)
            done, _ = ray.wait(list(pending), num_returns=1)
            start, worker = pending.pop(done[0])
            idle.append(worker)
            for completion in ray.get(done[0]):
                completion.prompt_index += start
                results.append(completion)
        results.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return results

    def update_weights(self, version: int, refs: list) -> list:
        import ray

        return ray.get([worker.update_weights.remote(version, refs) for worker in self.workers])

    def sleep(self) -> None:
        import ray

        ray.get([worker.sleep.remote() for worker in self.workers])

    def wake_up(self) -> None:
        import ray

        ray.get([worker.wake_up.remote() for worker in self.workers])


class VerifierPool:
    def __init__(self, verifiers: list):
        self.verifiers = verifiers

    def score(self, prompts: list[str], completions: list[str], fields: list[dict]) -> ScoreResult:
        import ray

        size = -(-len(prompts) // len(self.verifiers))
        calls = [v.score.remote(prompts[i:i + size], completions[i:i + size], fields[i:i + size])
                 for v, i in zip(self.verifiers, range(0, len(prompts), size))]
        return merge_scores(ray.get(calls))


def merge_scores(parts: list[ScoreResult]) -> ScoreResult:
    """Concatenate the scores of consecutive slices of a batch (item order kept)."""
    names = list(parts[0].per_function)
    return ScoreResult(
        total=[v for part in parts for v in part.total],
        per_function={n: [v for part in parts for v in part.per_function[n]] for n in names},
        failures={n: sum(part.failures.get(n, 0) for part in parts) for n in names},
        timeouts={n: sum(part.timeouts.get(n, 0) for part in parts) for n in names},
        failed={n: [f for part in parts for f in part.failed.get(n, [False] * len(part.total))] for n in names},
        errors={n: [e for part in parts for e in part.errors.get(n, [])][:3] for n in names})


@dataclass
class Rollout:
    """One step's samples, scores and derived tensors (one row per completion)."""

    prompts: list[PromptRow]  # one per completion
    completions: list[Completion]
    scores: ScoreResult

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor(self.scores.total, dtype=torch.float32)


def reward_specs(config: GRPOConfig) -> list[RewardSpec]:
    return [RewardSpec(name=r.name or r.fn.rsplit(":", 1)[-1], fn=r.fn, weight=r.weight, timeout_s=r.timeout_s,
                       fallback=r.fallback) for r in config.rewards]


def compute_advantages(rewards: torch.Tensor, group_size: int, config: GRPOConfig) -> torch.Tensor:
    """(N,) sequence advantages; REINFORCE++'s are the rewards whitened over the whole batch."""
    if config.grpo.advantage == "rloo":
        return rloo_advantages(rewards, group_size)
    if config.grpo.advantage == "reinforce_pp":
        return masked_whiten(rewards, torch.ones_like(rewards, dtype=torch.bool))
    return group_advantages(rewards, group_size, scale=config.grpo.scale)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) True where every sample of a group got the same reward (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) == 0


def run_grpo(config: GRPOConfig) -> StageResult:
    started = time.perf_counter()
    setup = prepare_stage(config)
    tokenizer = setup.tokenizer
    pad_id = tokenizer.pad_token_id
    group = config.rollout.group_size
    prompts_per_step = config.grpo.prompts_per_step

    # Reward functions resolve now, on the driver: a bad spec fails before any actor starts.
    specs = reward_specs(config)
    RewardScorer(specs, base_dir=os.getcwd()).load()

    # Data: prompts (plus fields for the reward functions); a deterministic prompt order per step.
    train_prompts = load_prompts(config.data.train, tokenizer, config.data.max_prompt_length)
    eval_prompts = (load_prompts(config.data.eval, tokenizer, config.data.max_prompt_length)[: config.eval.max_examples]
                    if config.data.eval else [])
    prompt_order = StepBatcher(train_prompts, global_batch_size=prompts_per_step, micro_batch_size=prompts_per_step,
                               world_size=1, seed=config.seed, shuffle=config.data.shuffle,
                               collate=lambda rows: rows, unit="prompts")
    total_steps = config.train.max_steps
    optimizer_steps = total_steps * config.grpo.mini_batches * config.grpo.epochs
    objective = PolicyGradientObjective(
        ratio_level=config.grpo.ratio_level, eps_low=config.grpo.eps_low, eps_high=config.grpo.eps_high,
        kl_coef=config.grpo.kl_coef, kl_kind=config.grpo.kl_kind, aggregation=config.grpo.loss_aggregation,
        norm_constant=float(config.rollout.max_new_tokens), tis_cap=config.grpo.tis_cap,
        overlong_filter=config.grpo.overlong_filter)
    sampling = SamplingSettings(n=group, temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                                top_k=config.rollout.top_k, max_new_tokens=config.rollout.max_new_tokens,
                                stop=list(config.rollout.stop))
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=config.rollout.max_new_tokens,
                              stop=list(config.rollout.stop))

    with ray_session(config.ray):
        import ray

        # Roles. Colocated: rollout worker i shares trainer rank i's bundle (and sleeps while it trains).
        colocated = config.placement == "colocated"
        shared = {"CPU": config.rollout.num_cpus, "GPU": config.rollout.num_gpus} if colocated else None
        trainers = TrainerGroup(_spec(config, setup.model_path, optimizer_steps), num_cpus=config.trainer.num_cpus,
                                num_gpus=config.trainer.num_gpus, shared_bundle=shared)
        rollout = RolloutPool(_rollout_workers(config, setup.model_path, trainers if colocated else None))
        verifiers = VerifierPool([ray.remote(Verifier).options(num_cpus=config.verifier.num_cpus).remote(
            specs, base_dir=os.getcwd()) for _ in range(config.verifier.num_workers)])
        reference = None
        if config.grpo.kl_coef and config.model.peft is None:
            reference = ray.remote(ReferenceModel).options(
                num_cpus=config.reference.num_cpus, num_gpus=config.reference.num_gpus).remote(
                setup.model_path, num_threads=max(1, int(config.reference.num_cpus)))
        tracker = Tracker(setup.output_dir, config=config_to_dict(config), wandb=config.tracking.wandb,
                          total_steps=total_steps, start_step=setup.start_step,
                          progress=config.tracking.progress, description="grpo")

        def sync(version: int) -> tuple[float, int]:
            start = time.perf_counter()
            refs = trainers.export_weight_buckets(SYNC_BUCKET_BYTES)
            stats = rollout.update_weights(version, refs)
            return time.perf_counter() - start, stats[0].bytes

        def evaluate() -> dict[str, float]:
            completions = rollout.generate([p.prompt_ids for p in eval_prompts], greedy)
            scores = verifiers.score([p.prompt for p in eval_prompts], [c.text for c in completions],
                                     [p.fields for p in eval_prompts])
            first = next(iter(scores.per_function))
            return {"eval/accuracy": sum(scores.per_function[first]) / len(eval_prompts),
                    "eval/reward": sum(scores.total) / len(eval_prompts)}

        try:
            if setup.resume_from:
                trainers.load_checkpoint(str(setup.resume_from))
                sync(setup.start_step)
                tracker.write(f"resumed from {setup.resume_from} (step {setup.start_step})")
            if eval_prompts and config.eval.at_start and setup.start_step == 0:
                tracker.log(0, evaluate())

            final_eval: dict[str, float] = {}
            for step in range(setup.start_step, total_steps):
                times: dict[str, float] = {}
                step_start = time.perf_counter()

                # 1-2. Generate and score, topping up zero-variance groups (DAPO) if asked.
                rollout_data, sampling_stats = _sample(config, step, prompt_order, train_prompts, rollout, verifiers,
                                                       sampling, times)
                rewards = rollout_data.rewards

                # 3. Log-probs: the trainer's before any update, and the reference's for the KL term.
                t = time.perf_counter()
                tokens, sampler_logps = completion_tokens(
                    [c.prompt_ids for c in rollout_data.completions], [c.token_ids for c in rollout_data.completions],
                    [c.logprobs for c in rollout_data.completions], pad_id)
                old_logps = _chunked(lambda b: trainers.rank0("token_logprobs", b), tokens, config.train.micro_batch_size)
                ref_logps = None
                if config.grpo.kl_coef:
                    if reference is not None:
                        ref_logps = _chunked(lambda b: ray.get(reference.token_logprobs.remote(b)), tokens,
                                             config.train.micro_batch_size)
                    else:  # PEFT: the adapter-disabled policy is the reference
                        ref_logps = _chunked(lambda b: trainers.rank0("token_logprobs", b, reference=True), tokens,
                                             config.train.micro_batch_size)
                times["time/reference"] = time.perf_counter() - t

                # 4. Advantages.
                advantages = compute_advantages(rewards, group, config)

                # 5. Train: mini_batches x epochs optimizer steps (the engine sleeps if colocated).
                t = time.perf_counter()
                if colocated:
                    rollout.sleep()
                overlong = torch.tensor([c.finish_reason == "length" for c in rollout_data.completions])
                train_metrics = _train(config, trainers, objective, tokens, advantages, old_logps, sampler_logps,
                                       ref_logps, overlong, step)
                times["time/train"] = time.perf_counter() - t

                # 6. Sync the new weights into the engines.
                if colocated:
                    rollout.wake_up()
                sync_s, sync_bytes = sync(step + 1)
                times["time/sync"] = sync_s
                times["time/step"] = time.perf_counter() - step_start

                # 7. Metrics, eval, checkpoint.
                mask = tokens.loss_mask[:, 1:]
                lengths = torch.tensor([len(c.token_ids) for c in rollout_data.completions], dtype=torch.float32)
                gap = ((sampler_logps - old_logps).abs() * mask).sum() / mask.sum().clamp_min(1)
                num_tokens = tokens.num_tokens
                metrics = {
                    **train_metrics, **rollout_data.scores.metrics(), **sampling_stats, **times,
                    "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                    "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
                    "completion/truncated_frac": float(overlong.float().mean()),
                    "logprob_gap/sampler_trainer": float(gap), "policy_version": step + 1,
                    "sync/bytes": sync_bytes, "sync/gb_per_s": sync_bytes / max(sync_s, 1e-9) / 1e9,
                    "tokens_per_s": num_tokens / times["time/step"],
                }
                tracker.log(step + 1, metrics)
                tracker.advance()
                done = step + 1
                if eval_prompts and eval_due(config, done, total_steps):
                    final_eval = evaluate()
                    tracker.log(done, final_eval)
                if checkpoint_due(config, done, total_steps):
                    setup.checkpoints.save(done, lambda d: trainers.save_checkpoint(str(d)),
                                           {"total_steps": total_steps})

            final_model = export_final_model(trainers, tokenizer, setup.output_dir)
        finally:
            tracker.close()
            trainers.shutdown()
            for worker in rollout.workers:
                ray.kill(worker)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)


def _spec(config: GRPOConfig, model_path: str, optimizer_steps: int) -> TrainerSpec:
    from rayrl.sft import trainer_spec

    return trainer_spec(config, model_path, optimizer_steps)


def _rollout_workers(config: GRPOConfig, model_path: str, colocate_with: TrainerGroup | None) -> list:
    import ray

    if colocate_with is not None and config.rollout.num_workers > config.trainer.world_size:
        raise ValueError("placement=colocated needs rollout.num_workers <= trainer.world_size")
    workers = []
    for i in range(config.rollout.num_workers):
        options: dict[str, Any] = {"num_cpus": config.rollout.num_cpus, "num_gpus": config.rollout.num_gpus}
        strategy = colocate_with.bundle_strategy(i) if colocate_with is not None else None
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        workers.append(ray.remote(RolloutWorker).options(**options).remote(
            model_path, backend=config.rollout.backend, dtype=config.rollout.dtype, seed=config.seed + i,
            kv_cache_gib=config.rollout.kv_cache_gib, num_threads=max(1, int(config.rollout.num_cpus))))
    return workers


def _sample(config: GRPOConfig, step: int, prompt_order: StepBatcher, all_prompts: list[PromptRow],
            rollout: RolloutPool, verifiers: VerifierPool, sampling: SamplingSettings,
            times: dict[str, float]) -> tuple[Rollout, dict[str, float]]:
    """Generate and score this step's prompts; with dynamic sampling, replace zero-variance groups
    by fresh prompts for up to max_sampling_rounds rounds."""
    group = config.rollout.group_size
    wanted = config.grpo.prompts_per_step
    prompts = prompt_order.step_rows(step)
    rng = random.Random(config.seed * 7_919 + step)
    kept: list[tuple[PromptRow, list[Completion], ScoreResult]] = []
    spare: list[tuple[PromptRow, list[Completion], ScoreResult]] = []
    first_zero_frac = 0.0
    scored: list[ScoreResult] = []
    times["time/generate"] = times["time/reward"] = 0.0
    for round_index in range(config.grpo.max_sampling_rounds if config.grpo.dynamic_sampling else 1):
        t = time.perf_counter()
        round_sampling = replace(sampling, seed=(config.seed * 1_000_003 + step) * 101 + round_index)
        completions = rollout.generate([p.prompt_ids for p in prompts], round_sampling)
        times["time/generate"] += time.perf_counter() - t
        t = time.perf_counter()
        expanded = [p for p in prompts for _ in range(group)]
        scores = verifiers.score([p.prompt for p in expanded], [c.text for c in completions],
                                 [p.fields for p in expanded])
        times["time/reward"] += time.perf_counter() - t
        scored.append(scores)
        flat = torch.tensor(scores.total)
        zero = zero_variance_groups(flat, group)
        if round_index == 0:
            first_zero_frac = float(zero.float().mean())
        for g, prompt in enumerate(prompts):
            entry = (prompt, completions[g * group:(g + 1) * group], _slice_scores(scores, g * group, (g + 1) * group))
            (spare if (config.grpo.dynamic_sampling and zero[g]) else kept).append(entry)
        if len(kept) >= wanted:
            break
        prompts = rng.sample(all_prompts, wanted - len(kept))
    filled = kept[:wanted]
    unfilled = wanted - len(filled)
    filled += spare[:unfilled]  # out of rounds: keep zero-variance groups (advantage 0) to fill the step
    rows = [entry[0] for entry in filled for _ in range(group)]
    completions = [c for entry in filled for c in entry[1]]
    scores = merge_scores([entry[2] for entry in filled])
    # failure and timeout rates over everything scored this step (dropped groups included)
    stats = {k: v for k, v in merge_scores(scored).metrics().items() if k.endswith(("failure_rate", "timeout_rate"))}
    stats["groups/zero_variance_frac"] = first_zero_frac
    if config.grpo.dynamic_sampling:
        stats["groups/unfilled"] = float(max(0, wanted - len(kept)))
    return Rollout(rows, completions, scores), stats


def _slice_scores(scores: ScoreResult, start: int, stop: int) -> ScoreResult:
    """The scores of items [start, stop). Timeouts are only counted per batch, so a slice reports
    its failures (timeouts included) and no separate timeout count."""
    failed = {k: v[start:stop] for k, v in scores.failed.items()}
    return ScoreResult(total=scores.total[start:stop],
                       per_function={k: v[start:stop] for k, v in scores.per_function.items()},
                       failures={k: sum(v) for k, v in failed.items()}, timeouts=dict.fromkeys(failed, 0),
                       failed=failed)


def _chunked(fn, tokens, size: int) -> torch.Tensor:
    """Apply a (B, T) -> (B, T-1) log-prob function in row chunks and stitch the result."""
    from rayrl.data.batch import TokenBatch

    parts = []
    for start in range(0, tokens.input_ids.shape[0], size):
        rows = slice(start, start + size)
        part = TokenBatch(tokens.input_ids[rows], tokens.loss_mask[rows], tokens.position_ids[rows],
                          tokens.segment_ids[rows])
        parts.append(fn(part))
    return torch.cat(parts)


def _train(config: GRPOConfig, trainers: TrainerGroup, objective: PolicyGradientObjective, tokens,
           advantages: torch.Tensor, old_logps: torch.Tensor, sampler_logps: torch.Tensor,
           ref_logps: torch.Tensor | None, overlong: torch.Tensor, step: int) -> dict[str, float]:
    """mini_batches x epochs optimizer steps; each splits its sequences over ranks and micro-batches."""
    from rayrl.data.batch import TokenBatch

    total = tokens.input_ids.shape[0]
    per_step = config.sequences_per_optimizer_step
    world, micro = config.trainer.world_size, config.train.micro_batch_size
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    sums: dict[str, float] = {}
    count = 0
    for _ in range(config.grpo.epochs):
        order = torch.randperm(total, generator=generator)
        for start in range(0, total, per_step):
            index = order[start:start + per_step]
            mask = tokens.loss_mask[index][:, 1:]
            if objective.overlong_filter:
                mask = mask & ~overlong[index][:, None]
            per_rank = []
            for rank in range(world):
                rank_index = index[rank * (per_step // world):(rank + 1) * (per_step // world)]
                batches = []
                for m in range(0, len(rank_index), micro):
                    rows = rank_index[m:m + micro]
                    sub = TokenBatch(tokens.input_ids[rows], tokens.loss_mask[rows], tokens.position_ids[rows],
                                     tokens.segment_ids[rows])
                    batches.append(RolloutBatch(sub, advantages[rows], old_logps[rows], sampler_logps[rows],
                                                None if ref_logps is None else ref_logps[rows], overlong[rows]))
                per_rank.append(_trim(batches))
            metrics = trainers.train_policy_gradient_step(
                # max(1, .): a step whose every completion is filtered out trains on nothing (loss 0), not NaN
                per_rank, global_num_tokens=max(1, int(mask.sum())), global_num_seqs=max(1, int((mask.sum(-1) > 0).sum())),
                objective=objective)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
    return {key: value / count for key, value in sums.items()}


def _trim(batches: list[RolloutBatch]) -> list[RolloutBatch]:
    """Cut each micro-batch's padding columns to its own longest row (less work per forward)."""
    from rayrl.data.batch import TokenBatch

    trimmed = []
    for batch in batches:
        width = int((batch.tokens.segment_ids > 0).sum(-1).max())
        tokens = TokenBatch(*(t[:, :width] for t in (batch.tokens.input_ids, batch.tokens.loss_mask,
                                                      batch.tokens.position_ids, batch.tokens.segment_ids)))
        trimmed.append(RolloutBatch(tokens, batch.advantages, batch.old_logps[:, :width - 1],
                                    batch.sampler_logps[:, :width - 1],
                                    None if batch.ref_logps is None else batch.ref_logps[:, :width - 1],
                                    batch.overlong))
    return trimmed
