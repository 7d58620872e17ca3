"""The GRPO family and PPO on Ray: rollout workers (vLLM), verifiers, a reference model and a DeepSpeed
policy trainer, driven by one loop; PPO adds reward-model actors and a DeepSpeed critic.

Each step:
  1. generate   prompts_per_step prompts x group_size samples on the rollout workers
  2. score      the verifier pool (rule-based rewards, user functions; failures fall back, counted)
                and, for PPO, the reward models
  3. log-probs  the trainer's (the ratio's denominator) and, with a KL term, the reference's
  4. advantage  the algorithm family's estimator (``rayrl.rl_advantages``): group-normalised (GRPO /
                Dr. GRPO), leave-one-out (RLOO) or whitened (REINFORCE++); PPO: the critic's values,
                KL-penalised per-token rewards, GAE (token advantages)
  5. train      mini_batches x epochs optimizer steps of the clipped policy-gradient loss
                (PPO: and of the critic's clipped value loss, on the same mini-batches)
  6. sync       the new weights, bucketed, into the running engines (policy version + 1)
  7. log, eval, checkpoint

Departures from the papers: rewards are per sequence (outcome supervision); DAPO's dynamic sampling
tops a batch up with fresh prompts for at most ``max_sampling_rounds`` rounds, then keeps the
zero-variance groups it has (their advantage is 0) so that every step has the same size.

PPO's sequence score is the reward model's (plus any verifier rewards), given at the last completion token.

The roles (which actors exist, how they start, score, give log-probs and save) live in
``rayrl.rl_roles``; the advantage estimators in ``rayrl.rl_advantages``; this module is the loop.

Run:  rayrl train examples/grpo.yaml [key=value ...]   (PPO: examples/ppo.yaml)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

from rayrl.actors.rollout_worker import Completion, SamplingSettings
from rayrl.algorithms import overlong_penalty
from rayrl.checkpoint import CheckpointManager
from rayrl.cluster import describe_placement, record_placement
from rayrl.config import ConfigError, GRPOConfig, PolicySettings, PPOConfig, policy_settings
from rayrl.data.batching import StepBatcher
from rayrl.data.packing import balanced_micro_batches
from rayrl.data.rollout import PromptRow, RolloutBatch, ValueBatch, load_prompts
from rayrl.evaluation import pass_at_k_metrics
from rayrl.objectives import SAMPLER_TRAINER_GAP, PolicyGradientObjective
from rayrl.rewards.registry import RewardSpecError, check_import_finishes
from rayrl.rewards.scoring import RewardScorer, RewardSpec, ScoreResult
from rayrl.remote import RemoteCallTimeout, RoleFailed, first_line
from rayrl.rl_advantages import AdvantageEstimator, CriticUpdate, advantage_estimator
from rayrl.rl_roles import RLRoles, fit_unset_cpus, role_resources, start_roles
from rayrl.rl_sampling import Rollout, Score, StepSampling
from rayrl.rollout_scheduler import AsyncRollouts, SyncRollouts
from rayrl.scaling import take_scale_request
from rayrl.stage_common import StageResult, checkpoint_due, eval_due, prepare_stage, records_resumed_at, stage_run
from rayrl.sync_guard import EngineSync, ProbeBatch, SyncGuard
from rayrl.tracking import Tracker, check_finite_training, sample_rows, sample_table_due
from rayrl.trainer_group import PolicyTrainerGroup
from rayrl.weight_sync import WeightPusher

SYNC_BUCKET_BYTES = 64 << 20

_log = logging.getLogger(__name__)

def run_rl(config: GRPOConfig | PPOConfig) -> StageResult:
    """The RL loop for the GRPO family and PPO (``config.algorithm``); PPO's differences live in its
    advantage estimator (critic values, GAE, the KL coefficient) and its roles (reward models, critic)."""
    started = time.perf_counter()
    if config.ray.address is None:  # an embedded cluster: its size is this machine's (or ray.num_cpus)
        config, fitted = fit_unset_cpus(config, config.ray.num_cpus or len(os.sched_getaffinity(0)))
        if fitted:
            print(f"rayrl: note: {fitted}", file=sys.stderr)
    settings = policy_settings(config)
    # Reward functions resolve now, on the driver: a bad spec fails before anything starts or moves.
    specs = reward_specs(config)
    resolve_rewards(specs)
    setup = prepare_stage(config)
    check_context_length(config, setup.model_path)
    pad_id = setup.tokenizer.pad_token_id
    data = load_rl_data(config, setup.tokenizer)
    sampling = sampling_plan(config)
    warn_if_truncated_sampling(config)
    base_objective = policy_gradient_objective(config, settings)
    plan = update_plan(config)
    total_steps = config.train.max_steps
    micro, temperature = config.train.micro_batch_size, config.rollout.temperature

    with stage_run(config, setup, roles=role_resources(config), total_steps=total_steps,
                   description=config.algorithm) as run:
        roles = start_roles(config, setup.model_path, specs, pad_id)
        run.on_exit(roles.shutdown)
        tracker = run.tracker
        estimator = advantage_estimator(config, roles.critic)
        pusher = WeightPusher(config.resolved_weight_transport, roles.trainers.actors, roles.rollout.workers,
                              deadline_s=config.fault.timeouts.sync_s, trainer_who=roles.trainers.who,
                              worker_who=roles.rollout.who,
                              bucket_bytes=SYNC_BUCKET_BYTES, wire_dtype=config.rollout.dtype,
                              concurrent_loads=config.rollout.partial_rollouts,
                              adapter_only=config.rollout.lora_sync == "adapter")
        roles.rollout.actors.after_restart.append(pusher.catch_up)  # a restarted worker serves the current policy
        push = roles.rollout.actors.retry  # a push that loses a worker is redone once it is replaced
        guard = SyncGuard(ProbeBatch.from_prompts(data.train, config.sync.probe_prompts),
                          tolerance=config.sync.tolerance(config.rollout.dtype), every=config.sync.verify_every,
                          trainers=roles.trainers, rollout=roles.rollout, pad_id=pad_id,
                          deadline_s=config.fault.timeouts.sync_s)
        # Async: a load waits behind the worker's chunk in flight (up to a whole step's on one worker; with
        # partial rollouts only its probe does).
        engine_sync = EngineSync(pusher, guard, wait_at_once=config.rollout.mode == "sync",
                                 behind_s=0.0 if config.rollout.mode == "sync" else
                                 roles.rollout.generate_deadline_s(settings.prompts_per_step, sampling.train))
        score = stop_on_broken_rewards(with_overlong_penalty(roles.score, settings, config.rollout.max_new_tokens),
                                       config)

        # Which node each role's actors landed on: output_dir/placement.json and one console line.
        placed = record_placement(setup.output_dir, config.placement, roles.actors_by_role())
        if placed is not None:
            tracker.write(describe_placement(placed))
        if setup.resume_from:
            roles.load_checkpoint(setup.resume_from)
            estimator.load_state(CheckpointManager.load_state(setup.resume_from))
            records_resumed_at(config, setup.start_step)
            push(lambda: pusher.push(setup.start_step))
            tracker.write(f"resumed from {setup.resume_from} (step {setup.start_step})")
        if data.eval and config.eval.at_start and setup.start_step == 0:
            tracker.log(0, evaluate_policy(config, roles, data.eval, sampling))

        final_eval: dict[str, float] = {}
        step, trainer_restarts = setup.start_step, 0
        # Sync: each step's samples are generated when taken. Async: a thread keeps generating the next steps'.
        rollouts = start_rollouts(config, roles, score, data, sampling, step)
        run.on_exit(lambda: rollouts.stop())  # the current one (a trainer restart starts another)
        last_step_end = time.perf_counter()
        while step < total_steps:
            try:
                step_start = time.perf_counter()
                wanted = take_scale_request(setup.output_dir)  # `rayrl scale`: between steps, nothing in flight
                if wanted is not None and wanted != len(roles.rollout.workers):
                    engine_sync.wait()
                    with rollouts.paused():
                        tracker.write(roles.rollout.resize(wanted) if scalable(config) else
                                      f"ignoring rollout.num_workers={wanted}: this run's layout cannot change it")

                # 1-2. Generate and score, topping up zero-variance groups (DAPO) if asked.
                sampled, flow = rollouts.take(step)
                samples, sampling_stats, times = sampled.rollout, sampled.stats, dict(sampled.times)

                # 3. Log-probs: the trainer's before any update, and the reference's for the KL term. With
                # one optimizer step per batch the trainer's are the training forward's own (no pass here).
                t = time.perf_counter()
                tokens, sampler_logps = samples.token_batch(pad_id)
                old_logps = (roles.policy_logprobs(tokens, micro, temperature)
                             if needs_old_logprobs(plan, estimator) else None)
                ref_logps = roles.reference_logprobs(tokens, micro, temperature) if settings.kl_coef else None
                times["time/reference"] = time.perf_counter() - t

                # 4. Advantages: per sequence (GRPO family), or GAE per token over the critic's values (PPO).
                estimated = estimator.estimate(samples.rewards, tokens, old_logps, ref_logps, samples.valid)

                # 5. Train: mini_batches x epochs optimizer steps (the engines sleep if colocated).
                t = time.perf_counter()
                roles.pause_engines()
                batch = RolloutBatch(tokens, estimated.advantages, old_logps, sampler_logps, ref_logps, samples.overlong)
                train_metrics = train_on_rollout(plan, roles.trainers, estimator.objective(base_objective), batch, step,
                                                 estimated.critic_update)
                times["time/train"] = time.perf_counter() - t
                check_finite_training(step + 1, train_metrics, setup.checkpoints)
                estimator.observe(estimated, len(samples.completions))

                # 6. Sync the new weights into the engines and check them (async: the workers go on, each
                # loading before its next chunk; the trainer waits for the loads before its next push).
                roles.resume_engines()
                times.update(engine_sync.push(step + 1))
                rollouts.publish(step + 1)
                end = time.perf_counter()
                times["time/step"] = end - step_start
                samples_per_s = len(samples.completions) / max(end - last_step_end, 1e-9)
                last_step_end = end

                # 7. Metrics, eval, checkpoint.
                done = step + 1
                tracker.log(done, {**train_metrics, **estimated.metrics, **sampling_stats, **times,
                                   **rollout_metrics(samples, sampler_logps, old_logps, tokens.loss_mask[:, 1:]),
                                   **roles.fault_metrics(), "faults/trainer/restarts": float(trainer_restarts),
                                   **flow.metrics(), **staleness_metrics(samples, step),
                                   "samples/trained": float(len(samples.completions)), "samples_per_s": samples_per_s,
                                   "rollout/num_workers": float(len(roles.rollout.workers)),
                                   "policy_version": done, "tokens_per_s": tokens.num_tokens / times["time/step"]})
                if sample_table_due(config.tracking.sample_table_every, done):
                    log_sample_table(tracker, config, done, samples)
                tracker.advance()
                if data.eval and eval_due(config, done, total_steps):
                    engine_sync.wait()
                    with rollouts.paused():
                        final_eval = evaluate_policy(config, roles, data.eval, sampling)
                    tracker.log(done, final_eval)
                if checkpoint_due(config, done, total_steps):
                    setup.checkpoints.save(done, roles.save_checkpoint, {"total_steps": total_steps, **estimator.state()})
            except (RoleFailed, RemoteCallTimeout) as failure:
                # A policy or critic rank failed: rebuild the groups and go back to the newest checkpoint
                # (again if the rebuild itself fails, within the same budget).
                rollouts.stop()  # async: what it sampled ahead is of the steps being redone
                engine_sync.abandon()
                while True:
                    if not trainer_restart_allowed(config, roles, failure, trainer_restarts):
                        raise failure
                    trainer_restarts += 1
                    tracker.write(f"{first_line(failure)}; rebuilding the trainer group ({trainer_restarts} of "
                                  f"fault.max_trainer_restarts={config.fault.max_trainer_restarts})")
                    try:
                        step, estimator = restart_trainers(config, roles, setup.checkpoints, tracker)
                        pusher.use_trainers(roles.trainers.actors, roles.trainers.who)
                        guard.trainers = roles.trainers
                        push(lambda: pusher.rewind(step))
                        push(lambda: pusher.push(step))
                        break
                    except (RoleFailed, RemoteCallTimeout) as again:
                        failure = again
                rollouts = start_rollouts(config, roles, score, data, sampling, step)
                last_step_end = time.perf_counter()
                continue
            step += 1

        engine_sync.wait()  # the last push's loads and check
        # The policy as output_dir/final (PPO: the critic as output_dir/final_critic too).
        final_model = roles.export(setup.tokenizer, setup.output_dir)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)



def start_rollouts(config: GRPOConfig | PPOConfig, roles: RLRoles, score: Score, data: RLData, sampling: SamplingPlan,
                   first_step: int) -> SyncRollouts | AsyncRollouts:
    """The source of each step's samples from ``first_step`` on: sampled when taken (``rollout.mode: sync``)
    or ahead of the trainer by up to ``rollout.max_staleness`` versions (``async``, ``rayrl.rollout_scheduler``)."""
    settings = policy_settings(config)

    def new_step(step: int) -> StepSampling:
        return StepSampling(settings, config.rollout.group_size, config.seed, step, data.order.step_rows(step),
                            data.train, sampling.train)

    if config.rollout.mode == "sync":
        return SyncRollouts(roles.rollout, score, new_step)
    # The backstop on one step's wait: every round of it generated on one worker and scored on one verifier,
    # after a push and a worker's replacement.
    per_item_s = roles.verifiers.per_item_s if roles.verifiers is not None else 0.0
    completions = settings.prompts_per_step * config.rollout.group_size
    timeouts = config.fault.timeouts
    round_s = (roles.rollout.generate_deadline_s(settings.prompts_per_step, sampling.train) + timeouts.score_s
               + per_item_s * completions)
    return AsyncRollouts(roles.rollout, score, new_step, first_step=first_step, total_steps=config.train.max_steps,
                         max_staleness=config.rollout.max_staleness, group_size=config.rollout.group_size,
                         take_deadline_s=settings.max_sampling_rounds * round_s + timeouts.sync_s + timeouts.startup_s)


def staleness_metrics(samples: Rollout, step: int) -> dict[str, float]:
    """How many versions older than the trainer (version ``step``) the policies that started the samples
    were, and the fraction of samples that new weights took over mid-way (partial rollouts)."""
    lags = [step - c.policy_version for c in samples.completions]
    mixed = sum(1 for c in samples.completions if c.version_changes)
    return {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
            "async/mixed_version_frac": mixed / len(samples.completions)}


def trainer_restart_allowed(config: GRPOConfig | PPOConfig, roles: RLRoles, failure: Exception, done: int) -> bool:
    """A failure of a policy or critic rank, restarts left, and a transport that can take the rebuilt
    group (an NCCL broadcast group would need re-forming with every worker). Colocated rollout workers
    are started again with the trainers (they lived in their bundles)."""
    return (roles.trainer_failed(failure) and done < config.fault.max_trainer_restarts
            and config.resolved_weight_transport != "nccl")


def scalable(config: GRPOConfig | PPOConfig) -> bool:
    """Whether ``rayrl scale`` can change the rollout pool (``rayrl.scaling`` refuses the others)."""
    return config.placement != "colocated" and config.resolved_weight_transport != "nccl"


def restart_trainers(config: GRPOConfig | PPOConfig, roles: RLRoles, checkpoints: CheckpointManager,
                     tracker: Tracker) -> tuple[int, AdvantageEstimator]:
    """Fresh trainer groups with the newest intact checkpoint loaded (the initial weights without one);
    the metrics after it are dropped, as for a resumed run. Returns the step to continue from and the
    advantage estimator (its state, e.g. PPO's adaptive KL coefficient, from the checkpoint)."""
    roles.restart_trainers()
    estimator = advantage_estimator(config, roles.critic)
    latest, _ = checkpoints.latest_intact()
    step = 0
    if latest is not None:
        roles.load_checkpoint(latest)
        state = CheckpointManager.load_state(latest)
        estimator.load_state(state)
        step = state["step"]
    tracker.rewind(step)
    tracker.write(f"trainer group rebuilt; continuing from {latest.name if latest else 'the start'} (step {step})")
    return step, estimator


# ---- set-up --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RLData:
    train: list[PromptRow]
    eval: list[PromptRow]
    order: StepBatcher  # a deterministic prompt order per step (a resumed run replays it)


def load_rl_data(config: GRPOConfig | PPOConfig, tokenizer) -> RLData:
    """Prompts (plus fields for the reward functions) and the per-step prompt order."""
    drop = config.data.drop_long_prompts
    train = load_prompts(config.data.train, tokenizer, config.data.max_prompt_length, drop_long=drop)
    evals = (load_prompts(config.data.eval, tokenizer, config.data.max_prompt_length,
                          drop_long=drop)[: config.eval.max_examples] if config.data.eval else [])
    prompts_per_step = policy_settings(config).prompts_per_step
    order = StepBatcher(train, global_batch_size=prompts_per_step, micro_batch_size=prompts_per_step, world_size=1,
                        seed=config.seed, shuffle=config.data.shuffle, collate=lambda rows: rows, unit="prompts")
    return RLData(train, evals, order)


@dataclass(frozen=True)
class SamplingPlan:
    train: SamplingSettings  # group_size samples per prompt at rollout.temperature
    greedy: SamplingSettings  # eval: one greedy completion per prompt (accuracy, reward)
    eval: SamplingSettings  # eval: eval.samples completions per prompt at eval.temperature (pass@k)


def sampling_plan(config: GRPOConfig | PPOConfig) -> SamplingPlan:
    rollout, stop = config.rollout, list(config.rollout.stop)
    return SamplingPlan(
        train=SamplingSettings(n=rollout.group_size, temperature=rollout.temperature, top_p=rollout.top_p,
                               top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens, stop=stop),
        greedy=SamplingSettings(n=1, temperature=0.0, max_new_tokens=config.eval_max_new_tokens, stop=stop),
        eval=SamplingSettings(n=max(1, config.eval.samples), temperature=config.eval.temperature,
                              max_new_tokens=config.eval_max_new_tokens, stop=stop, seed=config.seed))


def policy_gradient_objective(config: GRPOConfig | PPOConfig, settings: PolicySettings) -> PolicyGradientObjective:
    """The policy loss settings every rank gets (KL as a loss term only where it is one)."""
    return PolicyGradientObjective(
        ratio_level=settings.ratio_level, eps_low=settings.eps_low, eps_high=settings.eps_high,
        kl_coef=settings.kl_coef if settings.kl_in_loss else 0.0, kl_kind=settings.kl_kind,
        aggregation=settings.loss_aggregation, norm_constant=float(config.rollout.max_new_tokens),
        off_policy=settings.off_policy, off_policy_cap=settings.off_policy_cap,
        overlong_filter=settings.overlong_filter, temperature=config.rollout.temperature)


def warn_if_truncated_sampling(config: GRPOConfig | PPOConfig) -> None:
    if config.rollout.top_p < 1 or config.rollout.top_k > 0:
        _log.warning("rollout.top_p / rollout.top_k truncate the sampling distribution: the engine's log-probs are of "
                     "the truncated one, the trainer's of the full softmax at rollout.temperature, so ratios are off "
                     "policy (logprob_gap/sampler_trainer shows by how much; %s.off_policy: tis corrects for it)", config.algorithm)


def reward_specs(config: GRPOConfig | PPOConfig) -> list[RewardSpec]:
    return [RewardSpec(name=r.metric_name, fn=r.fn, weight=r.weight, timeout_s=r.timeout_s, fallback=r.fallback,
                       options=r.options or None, on_failure=r.on_failure) for r in config.rewards]


def resolve_rewards(specs: list[RewardSpec]) -> None:
    """Load every reward function here, so a bad one is a config error naming ``rewards[i]``."""
    for index, spec in enumerate(specs):
        try:
            check_import_finishes(spec.fn, base_dir=os.getcwd(), options=spec.options)
            RewardScorer([spec], base_dir=os.getcwd()).load()
        except RewardSpecError as error:
            raise ConfigError(f"rewards[{index}].fn: {error}") from error


def check_context_length(config: GRPOConfig | PPOConfig, model_path: str) -> None:
    """The longest sequence (prompt + completion) must fit the model's positions, before any actor starts."""
    from transformers import AutoConfig  # slow import (transformers)

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    longest = config.data.max_prompt_length + max(config.rollout.max_new_tokens, config.eval_max_new_tokens)
    if limit is not None and longest > limit:
        raise ConfigError(f"data.max_prompt_length + rollout.max_new_tokens (or eval.max_new_tokens) = {longest} "
                          f"tokens, over the model's max_position_embeddings ({limit}, {model_path})")


def with_overlong_penalty(score: Score, settings: PolicySettings, max_new_tokens: int) -> Score:
    """``score`` plus DAPO's soft overlong punishment as one more reward (``overlong_penalty``), so that
    it counts in the advantages and in dynamic sampling's zero-variance test; ``score`` if it is off."""
    if not settings.overlong_buffer:
        return score

    def penalised(rows: list[PromptRow], completions: list[Completion]) -> ScoreResult:
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        penalty = settings.overlong_penalty_factor * overlong_penalty(lengths, max_new_tokens, settings.overlong_buffer)
        return score(rows, completions).with_reward("overlong_penalty", penalty.tolist())

    return penalised


class BrokenRewardError(ConfigError):
    """A reward function failed on every item of the run's first scored batch."""


def stop_on_broken_rewards(score: Score, config: GRPOConfig | PPOConfig) -> Score:
    """``score``, checking the first batch it scores: a reward function that failed on every item of it
    (a dataset without the field it needs, a sandbox that cannot start...) stops the run with its first
    error, unless its ``rewards[i].allow_all_failures`` is true. Later batches are not checked: one
    bad batch in a running job is counted (``reward/<name>/failure_rate``), not fatal."""
    checked = False

    def checked_score(rows: list[PromptRow], completions: list[Completion]) -> ScoreResult:
        nonlocal checked
        scores = score(rows, completions)
        if not checked:
            checked = True
            for index, reward in enumerate(config.rewards):
                failed = scores.failed.get(reward.metric_name, [])
                if failed and all(failed) and not reward.allow_all_failures:
                    first = (scores.errors.get(reward.metric_name) or ["no error message"])[0]
                    raise BrokenRewardError(
                        f"rewards[{index}] ({reward.fn}) failed on all {len(failed)} items of the first batch: "
                        f"{first}. Fix the function or the data (the rows' fields are passed as keyword "
                        f"arguments), or set rewards[{index}].allow_all_failures: true to train anyway")
        return scores

    return checked_score


# ---- 5. train ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MicroBatching:
    """How an optimizer step's sequences become each rank's micro-batches: ``micro_batch_size`` rows each,
    or with packing (``max_tokens`` set) token-budget micro-batches balanced over the ranks."""

    micro_batch_size: int
    max_tokens: int | None = None

    def split(self, rows: torch.Tensor, lengths: torch.Tensor, world_size: int) -> list[list[torch.Tensor]]:
        """Per rank, per micro-batch, the row indices (of ``rows``; ``lengths[i]``: row i's tokens). With
        packing every rank gets the same number of micro-batches, and one may be empty (its rank runs a
        forward that trains on nothing: ZeRO-3 needs every rank in every forward)."""
        if self.max_tokens is None:
            per_rank = len(rows) // world_size
            return [[rank_rows[m:m + self.micro_batch_size] for m in range(0, len(rank_rows), self.micro_batch_size)]
                    for rank_rows in (rows[r * per_rank:(r + 1) * per_rank] for r in range(world_size))]
        parts = balanced_micro_batches(lengths[rows].tolist(), world_size, self.max_tokens)
        return [[rows[torch.tensor(part, dtype=torch.long)] for part in rank] for rank in parts]


def micro_batch_rows(batch: RolloutBatch | ValueBatch, rows: torch.Tensor):
    """The micro-batch of ``batch``'s ``rows`` cut to its longest; no rows: row 0 training on nothing."""
    if len(rows) == 0:
        return batch.select(torch.zeros(1, dtype=torch.long)).trimmed().without_targets()
    return batch.select(rows).trimmed()


@dataclass(frozen=True)
class UpdatePlan:
    """How phase 5 splits one rollout batch: into optimizer steps, ranks and micro-batches."""

    epochs: int  # passes over the batch
    mini_batches: int  # optimizer steps per pass
    sequences_per_step: int  # sequences per optimizer step (the batch / mini_batches)
    world_size: int  # policy trainer ranks
    micro_batching: MicroBatching
    seed: int  # with the step number, seeds the shuffle of each pass


def update_plan(config: GRPOConfig | PPOConfig) -> UpdatePlan:
    return UpdatePlan(epochs=policy_settings(config).epochs, mini_batches=policy_settings(config).mini_batches,
                      sequences_per_step=config.sequences_per_optimizer_step,
                      world_size=config.trainer.world_size,
                      micro_batching=MicroBatching(config.train.micro_batch_size, config.max_tokens_per_micro_batch),
                      seed=config.seed)


def needs_old_logprobs(plan: UpdatePlan, estimator: AdvantageEstimator) -> bool:
    """Whether phase 3 runs the trainer's separate log-prob pass. Not when the batch takes one optimizer
    step and the advantages do not read them (GRPO family): the training forward runs on the same
    weights, so its detached log-probs are the "old" ones (as TRL does; the ratio is 1)."""
    return plan.epochs * plan.mini_batches > 1 or estimator.needs_policy_logprobs


def train_on_rollout(plan: UpdatePlan, trainers: PolicyTrainerGroup, objective: PolicyGradientObjective,
                     batch: RolloutBatch, step: int, critic_update: CriticUpdate | None = None) -> dict[str, float]:
    """``plan.epochs`` passes of optimizer steps over the whole rollout ``batch``; each splits its
    sequences over ranks and micro-batches (each cut to its own longest row). With a ``critic_update``
    (PPO), each mini-batch also takes one critic step of the clipped value loss towards the returns,
    alongside the policy's: the two need nothing from each other, so both groups train at once."""
    total = batch.num_examples
    lengths = batch.tokens.row_lengths()
    generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + step)
    sums: dict[str, float] = {}
    count = 0
    critic_s = 0.0  # the critic's optimizer steps (PPO), wall time; they overlap the policy's
    for _ in range(plan.epochs):
        order = torch.randperm(total, generator=generator)
        for start in range(0, total, plan.sequences_per_step):
            rows = order[start:start + plan.sequences_per_step]
            targets = batch.tokens.loss_mask[rows][:, 1:]
            if objective.overlong_filter:
                targets = targets & ~batch.overlong[rows][:, None]
            policy_step = trainers.start_policy_gradient_step(
                [[micro_batch_rows(batch, micro) for micro in rank]
                 for rank in plan.micro_batching.split(rows, lengths, plan.world_size)],
                # max(1, .): a step whose every completion is filtered out trains on nothing (loss 0), not NaN
                global_num_tokens=max(1, int(targets.sum())), global_num_seqs=max(1, int((targets.sum(-1) > 0).sum())),
                objective=objective)
            critic_start = time.perf_counter()
            critic_step = start_critic_step(critic_update, rows, lengths, plan.micro_batching)
            metrics = policy_step.wait()
            if critic_step is not None:
                metrics.update(critic_metrics(critic_step.wait()))
                critic_s += time.perf_counter() - critic_start
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
    out = {key: value / count for key, value in sums.items()}
    if critic_update is not None:
        out["time/train_critic"] = critic_s
    return out


def start_critic_step(update: CriticUpdate | None, rows: torch.Tensor, lengths: torch.Tensor,
                      micro_batching: MicroBatching):
    """The critic's optimizer step on the mini-batch ``rows``, started (not waited for); None without a critic."""
    if update is None:
        return None
    targets = update.targets
    return update.critic.start_value_step(
        [[micro_batch_rows(targets, micro) for micro in rank]
         for rank in micro_batching.split(rows, lengths, update.world_size)],
        global_num_tokens=max(1, int(targets.tokens.loss_mask[rows][:, 1:].sum())))


def critic_metrics(value_metrics: dict[str, float]) -> dict[str, float]:
    return {"critic/value_loss": value_metrics["loss"], "critic/vf_clip_frac": value_metrics.get("vf_clip_frac", 0.0),
            "critic/value_error": value_metrics.get("value_error", 0.0), "critic/grad_norm": value_metrics["grad_norm"],
            "critic/lr": value_metrics["lr"], "memory/critic_peak_rss_mb": value_metrics["memory/trainer_peak_rss_mb"]}


# ---- 7. metrics and eval -------------------------------------------------------------------------
def correct_flags(scores: ScoreResult) -> list[bool] | None:
    """Per completion: does the first verifier reward call it correct (reward > 0)? None without one."""
    verified = [name for name in scores.per_function if name != "reward_model"]
    return None if not verified else [v > 0 for v in scores.per_function[verified[0]]]


def accuracy(scores: ScoreResult) -> float | None:
    """The share of completions ``correct_flags`` calls correct; None without a verifier reward."""
    flags = correct_flags(scores)
    return None if flags is None else sum(flags) / max(1, len(flags))


def rollout_metrics(samples: Rollout, sampler_logps: torch.Tensor, old_logps: torch.Tensor | None,
                    mask: torch.Tensor) -> dict[str, float]:
    """Rewards, lengths, truncation, the sampler/trainer log-prob gap (without ``old_logps`` the
    training step reports it) and the oldest sampling version."""
    rewards = samples.rewards[samples.valid]  # excluded completions (on_failure: exclude) have no reward
    lengths = torch.tensor([len(c.token_ids) for c in samples.completions], dtype=torch.float32)
    gap = ({} if old_logps is None else
           {SAMPLER_TRAINER_GAP: float(((sampler_logps - old_logps).abs() * mask).sum() / mask.sum().clamp_min(1))})
    correct = accuracy(samples.scores)
    # Failure and timeout rates come from StepSampling, over everything scored (dropped groups too):
    # the kept groups' slices count no timeouts.
    reward_stats = {k: v for k, v in samples.scores.metrics().items()
                    if not k.endswith(("failure_rate", "timeout_rate", "not_applicable_rate"))}
    return {**reward_stats,
            **({"accuracy": correct} if correct is not None else {}),
            "reward/mean": float(rewards.mean()) if len(rewards) else 0.0,
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": float(samples.overlong.float().mean()),
            **gap,
            # the oldest policy version that sampled this step (the previous step's, after every sync)
            "policy_version/sampled_min": min(c.policy_version for c in samples.completions)}


def log_sample_table(tracker: Tracker, config: GRPOConfig | PPOConfig, step: int, samples: Rollout) -> None:
    tracker.log_samples(step, sample_rows(
        step, [p.prompt for p in samples.prompts], [c.text for c in samples.completions], samples.scores.total,
        group_size=config.rollout.group_size, limit=config.tracking.sample_table_rows,
        per_function=samples.scores.per_function,
        extra={"policy_version": [c.policy_version for c in samples.completions],
               # partial rollouts: the version of the last token (new weights may have taken over mid-way)
               "policy_version_last": [c.version_changes[-1][1] if c.version_changes else c.policy_version
                                       for c in samples.completions]}))


def evaluate_policy(config: GRPOConfig | PPOConfig, roles: RLRoles, eval_prompts: list[PromptRow],
                    sampling: SamplingPlan) -> dict[str, float]:
    """Greedy accuracy/reward, plus pass@k of eval.samples sampled completions per prompt (correct:
    the first verifier's reward is positive, as for ``accuracy``)."""
    prompt_ids = [p.prompt_ids for p in eval_prompts]
    scores = roles.score(eval_prompts, roles.rollout.generate(prompt_ids, sampling.greedy))
    out = {"eval/reward": sum(scores.total) / len(eval_prompts)}
    greedy_accuracy = accuracy(scores)
    if greedy_accuracy is not None:
        out["eval/accuracy"] = greedy_accuracy
    if roles.reward_models is not None:
        out["eval/reward_model"] = sum(scores.per_function["reward_model"]) / len(eval_prompts)
    n = config.eval.samples
    if n and greedy_accuracy is not None:
        rows = [p for p in eval_prompts for _ in range(n)]
        flags = correct_flags(roles.score(rows, roles.rollout.generate(prompt_ids, sampling.eval)))
        correct = [flags[i * n:(i + 1) * n] for i in range(len(eval_prompts))]
        out.update(pass_at_k_metrics(correct, config.eval.pass_k or sorted({1, n})))
    return out
