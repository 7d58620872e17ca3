"""The GRPO family and PPO on Ray: rollout workers (vLLM), verifiers, a reference model and a DeepSpeed
policy trainer, driven by one loop; PPO adds reward-model actors and a DeepSpeed critic.

Each step:
  1. generate   prompts_per_step prompts x group_size samples on the rollout workers
  2. score      the verifier pool (rule-based rewards, user functions; failures fall back, counted)
  3. log-probs  the trainer's (the ratio's denominator) and, with a KL term, the reference's
  4. advantage  group-normalised (GRPO / Dr. GRPO), leave-one-out (RLOO) or whitened (REINFORCE++);
                PPO: the critic's values, KL-penalised per-token rewards, GAE (token advantages)
  5. train      mini_batches x epochs optimizer steps of the clipped policy-gradient loss
                (PPO: and of the critic's clipped value loss, on the same mini-batches)
  6. sync       the new weights, bucketed, into the running engines (policy version + 1)
  7. log, eval, checkpoint

Departures from the papers: rewards are per sequence (outcome supervision); DAPO's dynamic sampling
tops a batch up with fresh prompts for at most ``max_sampling_rounds`` rounds, then keeps the
zero-variance groups it has (their advantage is 0) so that every step has the same size.

PPO's sequence score is the reward model's (plus any verifier rewards), given at the last completion token.

Run:  rayrl train examples/grpo.yaml [key=value ...]   (PPO: examples/ppo.yaml)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from rayrl.actors.critic import Critic, export_critic
from rayrl.actors.engine import TrainerSpec
from rayrl.actors.policy_trainer import PolicyGradientObjective
from rayrl.actors.reference_model import ReferenceModel
from rayrl.actors.reward_model import RewardModel, RewardModelPool
from rayrl.actors.rollout_worker import Completion, RolloutWorker, SamplingSettings
from rayrl.actors.verifier import Verifier
from rayrl.algorithms import group_advantages, overlong_penalty, reinforce_pp_advantages, rloo_advantages
from rayrl.algorithms.ppo import AdaptiveKLController, gae_advantages, kl_penalized_rewards
from rayrl.checkpoint import CheckpointManager
from rayrl.cluster import check_cluster_resources, describe_placement, ray_session, record_placement, trainer_roles
from rayrl.config import GRPOConfig, PPOConfig, config_to_dict
from rayrl.data.batching import StepBatcher
from rayrl.data.rollout import PromptRow, RolloutBatch, ValueBatch, completion_tokens, load_prompts
from rayrl.evaluation import pass_at_k_metrics
from rayrl.outputs import export_final_model
from rayrl.rewards.scoring import RewardScorer, RewardSpec, ScoreResult
from rayrl.stage_common import StageResult, checkpoint_due, eval_due, prepare_stage
from rayrl.tiny import resolve_model_path
from rayrl.tracking import Tracker, sample_rows, sample_table_due
from rayrl.trainer_group import TrainerGroup
from rayrl.weight_sync import WeightPusher

SYNC_BUCKET_BYTES = 64 << 20

_log = logging.getLogger(__name__)


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
                pending[worker.generate.remote(prompts, replace(sampling, seed_offset=start))] = (start, worker)
            done, _ = ray.wait(list(pending), num_returns=1)
            start, worker = pending.pop(done[0])
            idle.append(worker)
            for completion in ray.get(done[0]):
                completion.prompt_index += start
                results.append(completion)
        results.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return results

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


def resolve_rewards(specs: list[RewardSpec]) -> None:
    """Load every reward function here, so a bad one is a config error naming ``rewards[i]``."""
    from rayrl.config import ConfigError
    from rayrl.rewards.registry import RewardSpecError

    for index, spec in enumerate(specs):
        try:
            RewardScorer([spec], base_dir=os.getcwd()).load()
        except RewardSpecError as error:
            raise ConfigError(f"rewards[{index}].fn: {error}") from error


def reward_specs(config: GRPOConfig | PPOConfig) -> list[RewardSpec]:
    return [RewardSpec(name=r.metric_name, fn=r.fn, weight=r.weight, timeout_s=r.timeout_s, fallback=r.fallback,
                       options=r.options or None) for r in config.rewards]


def compute_advantages(rewards: torch.Tensor, group_size: int, config: GRPOConfig,
                       mask: torch.Tensor) -> torch.Tensor:
    """(N,) sequence advantages (group, rloo), or (N, T-1) token advantages for REINFORCE++: each
    completion's score at its last token, returns over tokens (gamma 1: the score at every token),
    whitened over all tokens of the batch (Hu 2025; the KL stays a loss term here). The "baseline"
    variant subtracts each group's mean score first."""
    advantage = config.grpo.advantage
    if advantage == "rloo":
        return rloo_advantages(rewards, group_size)
    if advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        scores = group_advantages(rewards, group_size, scale="none") if advantage == "reinforce_pp_baseline" else rewards
        token_rewards = torch.zeros(mask.shape, dtype=torch.float32)
        last = mask.long().cumsum(-1).argmax(-1)  # each row's last completion token
        token_rewards[torch.arange(len(rewards)), last] = scores.float()
        advantages, _ = reinforce_pp_advantages(token_rewards, mask)
        return advantages
    return group_advantages(rewards, group_size, scale=config.grpo.scale)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) True where every sample of a group got the same reward (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) == 0


@dataclass(frozen=True)
class PPOAdvantageSettings:
    """What ``ppo_advantages`` needs of the PPO settings (kl_coef is the current, maybe adapted, one)."""

    kl_coef: float = 0.05
    kl_kind: str = "k1"
    kl_in: str = "reward"
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True


def ppo_advantages(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                   values: torch.Tensor, mask: torch.Tensor,
                   settings: PPOAdvantageSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's (B, T-1) token advantages, returns and per-token rewards of one rollout batch.

    Per-token rewards are the sequence score at the last completion token minus kl_coef x KL_t to the
    reference (``kl_penalized_rewards``; with ``kl_in="loss"`` or no reference, the score alone);
    advantages and returns are GAE over the critic's values (``gae_advantages``)."""
    if ref_logps is None or settings.kl_in != "reward":
        ref_logps, kl_coef = old_logps, 0.0
    else:
        kl_coef = settings.kl_coef
    token_rewards = kl_penalized_rewards(scores, old_logps, ref_logps, mask, kl_coef=kl_coef,
                                         kl_kind=settings.kl_kind)
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma=settings.gamma, lam=settings.lam,
                                         whiten=settings.whiten)
    return advantages, returns, token_rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect critic)."""
    m = mask.bool()
    r, v = returns[m], values[m]
    if r.numel() < 2:
        return float("nan")
    var = r.var()
    return float(1 - (r - v).var() / var) if var > 0 else float("nan")


def _sequence_kl(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of the summed k1 KL(pi || ref) of the sampled tokens."""
    return float(((old_logps - ref_logps) * mask).sum(-1).mean())


def run_rl(config: GRPOConfig | PPOConfig) -> StageResult:
    """The RL loop for the GRPO family and PPO (``config.algorithm``); PPO adds a reward model, a
    critic and GAE token advantages as branches of the same steps."""
    started = time.perf_counter()
    ppo = isinstance(config, PPOConfig)
    settings = config.settings
    # Reward functions resolve now, on the driver: a bad spec fails before anything starts or moves.
    specs = reward_specs(config)
    resolve_rewards(specs)
    check_context_length(config, resolve_model_path(config.model.path))
    setup = prepare_stage(config)
    tokenizer = setup.tokenizer
    pad_id = tokenizer.pad_token_id
    group = config.rollout.group_size
    prompts_per_step = settings.prompts_per_step

    # Data: prompts (plus fields for the reward functions); a deterministic prompt order per step.
    drop = config.data.drop_long_prompts
    train_prompts = load_prompts(config.data.train, tokenizer, config.data.max_prompt_length, drop_long=drop)
    eval_prompts = (load_prompts(config.data.eval, tokenizer, config.data.max_prompt_length,
                                 drop_long=drop)[: config.eval.max_examples] if config.data.eval else [])
    prompt_order = StepBatcher(train_prompts, global_batch_size=prompts_per_step, micro_batch_size=prompts_per_step,
                               world_size=1, seed=config.seed, shuffle=config.data.shuffle,
                               collate=lambda rows: rows, unit="prompts")
    total_steps = config.train.max_steps
    optimizer_steps = config.schedule_steps  # the LR schedule spans every optimizer step
    # KL to the reference: GRPO's is a loss term; PPO's is folded into the rewards or a loss term.
    kl_coef = settings.kl_coef
    kl_loss = config.kl_in_loss
    kl_controller = (AdaptiveKLController(config.ppo.kl_coef, config.ppo.kl_target, config.ppo.kl_horizon)
                     if ppo and config.ppo.adaptive_kl else None)
    objective = PolicyGradientObjective(
        ratio_level=settings.ratio_level, eps_low=settings.eps_low, eps_high=settings.eps_high,
        kl_coef=kl_coef if kl_loss else 0.0, kl_kind=settings.kl_kind, aggregation=settings.loss_aggregation,
        norm_constant=float(config.rollout.max_new_tokens), tis_cap=settings.tis_cap,
        overlong_filter=settings.overlong_filter, temperature=config.rollout.temperature)
    sampling = SamplingSettings(n=group, temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                                top_k=config.rollout.top_k, max_new_tokens=config.rollout.max_new_tokens,
                                stop=list(config.rollout.stop))
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=config.eval_max_new_tokens,
                              stop=list(config.rollout.stop))
    eval_sampling = SamplingSettings(n=max(1, config.eval.samples), temperature=config.eval.temperature,
                                     max_new_tokens=config.eval_max_new_tokens, stop=list(config.rollout.stop),
                                     seed=config.seed)

    if config.rollout.top_p < 1 or config.rollout.top_k > 0:
        _log.warning("rollout.top_p / rollout.top_k truncate the sampling distribution: the engine's log-probs are of "
                     "the truncated one, the trainer's of the full softmax at rollout.temperature, so ratios are off "
                     "policy (logprob_gap/sampler_trainer shows by how much; %s.tis_cap corrects for it)", config.algorithm)

    with ray_session(config.ray):
        check_cluster_resources(config.ray, rl_roles(config, bool(specs), ppo, bool(kl_coef)))

        # Cleanup runs last-in first-out and each step runs even if an earlier one raised: the
        # actors are ended on any failure, also on a shared cluster.
        with contextlib.ExitStack() as cleanup:
            roles = start_roles(config, setup.model_path, specs, optimizer_steps, pad_id, reference=bool(kl_coef))
            trainers, rollout, critic, colocated = roles.trainers, roles.rollout, roles.critic, roles.colocated
            cleanup.callback(roles.shutdown)
            tracker = Tracker(setup.output_dir, config=config_to_dict(config), wandb=config.tracking.wandb,
                              total_steps=total_steps, start_step=setup.start_step,
                              progress=config.tracking.progress, description=config.algorithm)
            cleanup.callback(tracker.close)

            pusher = WeightPusher(config.resolved_weight_transport, trainers.actors, rollout.workers,
                                  bucket_bytes=SYNC_BUCKET_BYTES, wire_dtype=config.rollout.dtype)

            score = with_overlong_penalty(roles.score, config)

            def evaluate() -> dict[str, float]:
                return _evaluate(config, roles, eval_prompts, greedy, eval_sampling)

            def save(directory) -> None:
                trainers.save_checkpoint(str(directory))
                if critic is not None:
                    critic.save_checkpoint(str(directory / "critic"))

            # Which node each role's actors landed on: output_dir/placement.json and one console line.
            placed = record_placement(setup.output_dir, config.placement, roles.actors_by_role())
            if placed is not None:
                tracker.write(describe_placement(placed))
            if setup.resume_from:
                trainers.load_checkpoint(str(setup.resume_from))
                if critic is not None:
                    critic.load_checkpoint(str(setup.resume_from / "critic"))
                if kl_controller is not None:
                    kl_controller.value = CheckpointManager.load_state(setup.resume_from).get(
                        "kl_coef", kl_controller.value)
                pusher.push(setup.start_step)
                tracker.write(f"resumed from {setup.resume_from} (step {setup.start_step})")
            if eval_prompts and config.eval.at_start and setup.start_step == 0:
                tracker.log(0, evaluate())

            final_eval: dict[str, float] = {}
            for step in range(setup.start_step, total_steps):
                times: dict[str, float] = {}
                step_start = time.perf_counter()

                # 1-2. Generate and score, topping up zero-variance groups (DAPO) if asked.
                rollout_data, sampling_stats = _sample(config, step, prompt_order, train_prompts, rollout, score,
                                                       sampling, times)
                rewards = rollout_data.rewards

                # 3. Log-probs: the trainer's before any update, and the reference's for the KL term.
                t = time.perf_counter()
                tokens, sampler_logps = completion_tokens(
                    [c.prompt_ids for c in rollout_data.completions], [c.token_ids for c in rollout_data.completions],
                    [c.logprobs for c in rollout_data.completions], pad_id)
                old_logps, ref_logps = _logprobs(roles, tokens, config.train.micro_batch_size, reference=bool(kl_coef),
                                                temperature=config.rollout.temperature)
                times["time/reference"] = time.perf_counter() - t
                mask = tokens.loss_mask[:, 1:]

                # 4. Advantages: per sequence (GRPO family), or GAE per token over the critic's values (PPO).
                ppo_metrics: dict[str, float] = {}
                values = returns = None
                if ppo:
                    t = time.perf_counter()
                    values = _chunked(lambda b: critic.rank0("values", b), tokens, config.train.micro_batch_size)
                    times["time/values"] = time.perf_counter() - t
                    current_kl = kl_controller.value if kl_controller is not None else kl_coef
                    advantages, returns, ppo_metrics = _gae_advantages(config, rewards, old_logps, ref_logps, values,
                                                                       mask, current_kl)
                    if kl_loss:
                        objective = replace(objective, kl_coef=current_kl)
                else:
                    advantages = compute_advantages(rewards, group, config, mask)

                # 5. Train: mini_batches x epochs optimizer steps (the engine sleeps if colocated).
                t = time.perf_counter()
                if colocated:
                    rollout.sleep()
                overlong = torch.tensor([c.finish_reason == "length" for c in rollout_data.completions])
                train_metrics = _train(config, trainers, objective, tokens, advantages, old_logps, sampler_logps,
                                       ref_logps, overlong, step, critic=critic, values=values, returns=returns)
                times["time/train"] = time.perf_counter() - t
                if kl_controller is not None and ref_logps is not None:
                    kl_controller.update(ppo_metrics["kl/rollout"], n_steps=len(rollout_data.completions))

                # 6. Sync the new weights into the engines.
                if colocated:
                    rollout.wake_up()
                sync_s, sync_bytes = pusher.push(step + 1)
                times["time/sync"] = sync_s
                times["time/step"] = time.perf_counter() - step_start

                # 7. Metrics, eval, checkpoint.
                metrics = {**train_metrics, **ppo_metrics, **sampling_stats, **times,
                           **_rollout_metrics(rollout_data, sampler_logps, old_logps, mask, overlong),
                           "policy_version": step + 1, "sync/bytes": sync_bytes,
                           "sync/gb_per_s": sync_bytes / max(sync_s, 1e-9) / 1e9,
                           "tokens_per_s": tokens.num_tokens / times["time/step"]}
                tracker.log(step + 1, metrics)
                if sample_table_due(config.tracking.sample_table_every, step + 1):
                    tracker.log_samples(step + 1, sample_rows(
                        step + 1, [p.prompt for p in rollout_data.prompts], [c.text for c in rollout_data.completions],
                        rollout_data.scores.total, group_size=group, limit=config.tracking.sample_table_rows,
                        per_function=rollout_data.scores.per_function,
                        extra={"policy_version": [c.policy_version for c in rollout_data.completions]}))
                tracker.advance()
                done = step + 1
                if eval_prompts and eval_due(config, done, total_steps):
                    final_eval = evaluate()
                    tracker.log(done, final_eval)
                if checkpoint_due(config, done, total_steps):
                    state = {"total_steps": total_steps}
                    if kl_controller is not None:
                        state["kl_coef"] = kl_controller.value  # the adaptive coefficient resumes too
                    setup.checkpoints.save(done, save, state)

            final_model = export_final_model(trainers, tokenizer, setup.output_dir)
            if critic is not None:  # PPO: the value model too, as output_dir/final_critic
                export_critic(critic, tokenizer, setup.output_dir)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)


run_grpo = run_rl
run_ppo = run_rl


@dataclass
class RLRoles:
    """Every actor of one RL run. Colocated: rollout worker i shares trainer rank i's bundle (and
    sleeps while it trains)."""

    trainers: TrainerGroup
    rollout: RolloutPool
    colocated: bool
    verifiers: VerifierPool | None = None
    reward_models: RewardModelPool | None = None
    critic: TrainerGroup | None = None
    reference: Any = None  # a ReferenceModel actor (none with PEFT: the adapter-disabled policy is it)

    def score(self, rows: list[PromptRow], completions: list[Completion]) -> ScoreResult:
        """Verifier rewards (GRPO) or reward-model scores plus any verifier rewards (PPO)."""
        parts = None
        if self.verifiers is not None:
            parts = self.verifiers.score([p.prompt for p in rows], [c.text for c in completions],
                                         [p.fields for p in rows])
        if self.reward_models is None:
            return parts
        rm = self.reward_models.score([p.prompt_ids + c.token_ids for p, c in zip(rows, completions)])
        n = len(rm)
        if parts is None:
            return ScoreResult(total=rm, per_function={"reward_model": rm}, failures={"reward_model": 0},
                               timeouts={"reward_model": 0}, failed={"reward_model": [False] * n})
        return ScoreResult(total=[a + b for a, b in zip(rm, parts.total)],
                           per_function={"reward_model": rm, **parts.per_function},
                           failures={"reward_model": 0, **parts.failures},
                           timeouts={"reward_model": 0, **parts.timeouts},
                           failed={"reward_model": [False] * n, **parts.failed}, errors=parts.errors)

    def actors_by_role(self) -> dict[str, list]:
        return {"trainer": self.trainers.actors, "rollout": self.rollout.workers,
                "verifier": self.verifiers.verifiers if self.verifiers is not None else [],
                "reference": [self.reference] if self.reference is not None else [],
                "reward_model": self.reward_models.workers if self.reward_models is not None else [],
                "critic": self.critic.actors if self.critic is not None else []}

    def shutdown(self) -> None:
        """Release the process groups, then end every actor (also on an existing, shared cluster).
        Best effort: a role that fails to stop (e.g. a dead rank) is reported and the rest still end."""
        import ray

        steps = [self.trainers.shutdown]
        if self.critic is not None:
            steps.append(self.critic.shutdown)
        if self.reward_models is not None:
            steps.append(self.reward_models.shutdown)
        for name, actors in self.actors_by_role().items():
            if name not in ("trainer", "critic", "reward_model"):
                steps.extend(lambda actor=actor: ray.kill(actor) for actor in actors)
        for step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - keep ending the other roles
                _log.warning("shutting down an RL role failed: %r", error)


def start_roles(config: GRPOConfig | PPOConfig, model_path: str, specs: list[RewardSpec], optimizer_steps: int,
                pad_id: int, *, reference: bool) -> RLRoles:
    """Create every role's actors; if one fails to start, those already started are ended."""
    import ray

    colocated = config.placement == "colocated"
    shared = ({"CPU": config.rollout.num_cpus, "GPU": config.rollout.num_gpus, **config.rollout.resources}
              if colocated else None)
    trainers = TrainerGroup(_spec(config, model_path, optimizer_steps), num_cpus=config.trainer.num_cpus,
                            num_gpus=config.trainer.num_gpus, shared_bundle=shared, resources=config.trainer.resources)
    roles = RLRoles(trainers, RolloutPool([]), colocated)
    try:
        roles.rollout = RolloutPool(_rollout_workers(config, model_path, trainers if colocated else None))
        if specs:
            roles.verifiers = VerifierPool([ray.remote(Verifier).options(
                num_cpus=config.verifier.num_cpus, resources=dict(config.verifier.resources)).remote(
                specs, base_dir=os.getcwd()) for _ in range(config.verifier.num_workers)])
        if isinstance(config, PPOConfig):
            rm_path = resolve_model_path(config.reward_model.path)
            roles.reward_models = RewardModelPool([ray.remote(RewardModel).options(
                num_cpus=config.reward_model.num_cpus, num_gpus=config.reward_model.num_gpus,
                resources=dict(config.reward_model.resources)).remote(
                rm_path, pad_token_id=pad_id, num_threads=max(1, int(config.reward_model.num_cpus)),
                batch_size=config.train.micro_batch_size) for _ in range(config.reward_model.num_workers)])
            critic_path = rm_path if config.critic.init == "reward_model" else model_path
            roles.critic = TrainerGroup(_critic_spec(config, critic_path, optimizer_steps),
                                        num_cpus=config.critic.num_cpus, num_gpus=config.critic.num_gpus, role=Critic,
                                        resources=config.critic.resources,
                                        role_kwargs={"value_clip": config.critic.value_clip})
        if reference and config.model.peft is None:
            roles.reference = ray.remote(ReferenceModel).options(
                num_cpus=config.reference.num_cpus, num_gpus=config.reference.num_gpus,
                resources=dict(config.reference.resources)).remote(
                model_path, num_threads=max(1, int(config.reference.num_cpus)))
    except BaseException:
        roles.shutdown()
        raise
    return roles


def _logprobs(roles: RLRoles, tokens, micro_batch_size: int, *, reference: bool,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trainer's token log-probs before any update (the ratio's denominator) and, for a KL term,
    the reference's (the ReferenceModel actor, or with PEFT the adapter-disabled policy), both at the
    sampling temperature, as the engine's are."""
    import ray

    trainers = roles.trainers
    old = _chunked(lambda b: trainers.rank0("token_logprobs", b, temperature=temperature), tokens, micro_batch_size)
    if not reference:
        return old, None
    if roles.reference is not None:
        ref = _chunked(lambda b: ray.get(roles.reference.token_logprobs.remote(b, temperature=temperature)),
                       tokens, micro_batch_size)
    else:
        ref = _chunked(lambda b: trainers.rank0("token_logprobs", b, reference=True, temperature=temperature),
                       tokens, micro_batch_size)
    return old, ref


def _gae_advantages(config: PPOConfig, rewards: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                    values: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """PPO's per-token advantages and returns (GAE over the critic's values), with their metrics."""
    advantages, returns, token_rewards = ppo_advantages(
        rewards, old_logps, ref_logps, values, mask, PPOAdvantageSettings(
            kl_coef=kl_coef, kl_kind=config.ppo.kl_kind, kl_in=config.ppo.kl_in,
            gamma=config.ppo.gamma, lam=config.ppo.lam, whiten=config.ppo.whiten_advantages))
    m = mask.float()
    metrics = {"kl_coef": kl_coef,
               "returns/mean": float((returns * m).sum() / m.sum().clamp_min(1)),
               "values/mean": float((values * m).sum() / m.sum().clamp_min(1)),
               "token_rewards/sum_mean": float((token_rewards * m).sum(-1).mean()),
               "critic/explained_variance": explained_variance(values, returns, mask)}
    if ref_logps is not None:
        metrics["kl/rollout"] = _sequence_kl(old_logps, ref_logps, m)
    return advantages, returns, metrics


def check_context_length(config: GRPOConfig | PPOConfig, model_path: str) -> None:
    """The longest sequence (prompt + completion) must fit the model's positions, before any actor starts."""
    from transformers import AutoConfig

    from rayrl.config import ConfigError

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    longest = config.data.max_prompt_length + max(config.rollout.max_new_tokens, config.eval_max_new_tokens)
    if limit is not None and longest > limit:
        raise ConfigError(f"data.max_prompt_length + rollout.max_new_tokens (or eval.max_new_tokens) = {longest} "
                          f"tokens, over the model's max_position_embeddings ({limit}, {model_path})")


def with_overlong_penalty(score, config: GRPOConfig | PPOConfig):
    """``score`` plus DAPO's soft overlong punishment as one more reward (``overlong_penalty``), so that
    it counts in the advantages and in dynamic sampling's zero-variance test; ``score`` if it is off."""
    settings = config.settings
    if not settings.overlong_buffer:
        return score

    def penalised(rows: list[PromptRow], completions: list[Completion]) -> ScoreResult:
        result = score(rows, completions)
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        penalty = (settings.overlong_penalty_factor * overlong_penalty(
            lengths, config.rollout.max_new_tokens, settings.overlong_buffer)).tolist()
        name = "overlong_penalty"
        return replace(result, total=[a + b for a, b in zip(result.total, penalty)],
                       per_function={**result.per_function, name: penalty}, failures={**result.failures, name: 0},
                       timeouts={**result.timeouts, name: 0}, failed={**result.failed, name: [False] * len(penalty)})

    return penalised


def correct_flags(scores: ScoreResult) -> list[bool] | None:
    """Per completion: does the first verifier reward call it correct (reward > 0)? None without one."""
    verified = [name for name in scores.per_function if name != "reward_model"]
    return None if not verified else [v > 0 for v in scores.per_function[verified[0]]]


def accuracy(scores: ScoreResult) -> float | None:
    """The share of completions ``correct_flags`` calls correct; None without a verifier reward."""
    flags = correct_flags(scores)
    return None if flags is None else sum(flags) / max(1, len(flags))


def _rollout_metrics(rollout_data: Rollout, sampler_logps: torch.Tensor, old_logps: torch.Tensor,
                     mask: torch.Tensor, overlong: torch.Tensor) -> dict[str, float]:
    """Rewards, lengths, truncation, the sampler/trainer log-prob gap and the oldest sampling version."""
    rewards = rollout_data.rewards
    lengths = torch.tensor([len(c.token_ids) for c in rollout_data.completions], dtype=torch.float32)
    gap = ((sampler_logps - old_logps).abs() * mask).sum() / mask.sum().clamp_min(1)
    correct = accuracy(rollout_data.scores)
    # Failure and timeout rates come from _sample, over everything scored (dropped groups too): the
    # kept groups' slices count no timeouts.
    reward_stats = {k: v for k, v in rollout_data.scores.metrics().items()
                    if not k.endswith(("failure_rate", "timeout_rate"))}
    return {**reward_stats,
            **({"accuracy": correct} if correct is not None else {}),
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": float(overlong.float().mean()),
            "logprob_gap/sampler_trainer": float(gap),
            # the oldest policy version that sampled this step (the previous step's, after every sync)
            "policy_version/sampled_min": min(c.policy_version for c in rollout_data.completions)}


def _evaluate(config: GRPOConfig | PPOConfig, roles: RLRoles, eval_prompts: list[PromptRow],
              greedy: SamplingSettings, sampled: SamplingSettings) -> dict[str, float]:
    """Greedy accuracy/reward, plus pass@k of eval.samples sampled completions per prompt (correct:
    the first verifier's reward is positive, as for ``accuracy``)."""
    prompt_ids = [p.prompt_ids for p in eval_prompts]
    scores = roles.score(eval_prompts, roles.rollout.generate(prompt_ids, greedy))
    out = {"eval/reward": sum(scores.total) / len(eval_prompts)}
    greedy_accuracy = accuracy(scores)
    if greedy_accuracy is not None:
        out["eval/accuracy"] = greedy_accuracy
    if roles.reward_models is not None:
        out["eval/reward_model"] = sum(scores.per_function["reward_model"]) / len(eval_prompts)
    n = config.eval.samples
    if n and greedy_accuracy is not None:
        rows = [p for p in eval_prompts for _ in range(n)]
        flags = correct_flags(roles.score(rows, roles.rollout.generate(prompt_ids, sampled)))
        correct = [flags[i * n:(i + 1) * n] for i in range(len(eval_prompts))]
        out.update(pass_at_k_metrics(correct, config.eval.pass_k or sorted({1, n})))
    return out


def rl_roles(config: GRPOConfig | PPOConfig, verifiers: bool, ppo: bool, kl: bool) -> dict[str, tuple[float, float]]:
    """CPUs and GPUs each role asks for (colocated rollout workers add to the trainer's bundles)."""
    roles = trainer_roles(config)
    rollout = config.rollout
    # Colocated, every trainer rank's bundle reserves one worker's share, used or not.
    slots = config.trainer.world_size if config.placement == "colocated" else rollout.num_workers
    roles["rollout"] = (slots * rollout.num_cpus, slots * rollout.num_gpus)
    if verifiers:
        roles["verifier"] = (config.verifier.num_workers * config.verifier.num_cpus, 0.0)
    if ppo:
        rm, critic = config.reward_model, config.critic
        roles["reward_model"] = (rm.num_workers * rm.num_cpus, rm.num_workers * rm.num_gpus)
        roles["critic"] = (critic.world_size * critic.num_cpus, critic.world_size * critic.num_gpus)
    if kl and config.model.peft is None:
        roles["reference"] = (config.reference.num_cpus, config.reference.num_gpus)
    return roles


def _spec(config: GRPOConfig | PPOConfig, model_path: str, optimizer_steps: int) -> TrainerSpec:
    from rayrl.sft import trainer_spec

    return trainer_spec(config, model_path, optimizer_steps)


def _critic_spec(config: PPOConfig, model_path: str, optimizer_steps: int) -> TrainerSpec:
    """The policy's engine settings with the critic section's own lr, world size and DeepSpeed settings."""
    return replace(_spec(config, model_path, optimizer_steps), world_size=config.critic.world_size,
                   grad_accum_steps=config.critic_grad_accum_steps, lr=config.critic.lr,
                   zero_stage=config.critic.zero_stage, deepspeed_overrides=config.critic.deepspeed,
                   peft=config.critic.peft, num_threads=max(1, int(config.critic.num_cpus)))


def _rollout_workers(config: GRPOConfig | PPOConfig, model_path: str, colocate_with: TrainerGroup | None) -> list:
    import ray

    workers = []
    for i in range(config.rollout.num_workers):
        options: dict[str, Any] = {"num_cpus": config.rollout.num_cpus, "num_gpus": config.rollout.num_gpus,
                                   "resources": dict(config.rollout.resources)}
        strategy = colocate_with.bundle_strategy(i) if colocate_with is not None else None
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        workers.append(ray.remote(RolloutWorker).options(**options).remote(
            model_path, backend=config.rollout.backend, dtype=config.rollout.dtype, seed=config.seed + i,
            kv_cache_gib=config.rollout.kv_cache_gib, num_threads=max(1, int(config.rollout.num_cpus)),
            # Colocated on GPUs the engine gives its weights and KV cache back while the trainer trains.
            enable_sleep_mode=colocate_with is not None and config.rollout.num_gpus > 0))
    return workers


def _sample(config: GRPOConfig | PPOConfig, step: int, prompt_order: StepBatcher, all_prompts: list[PromptRow],
            rollout: RolloutPool, score, sampling: SamplingSettings,
            times: dict[str, float]) -> tuple[Rollout, dict[str, float]]:
    """Generate and score this step's prompts (``score(rows, completions) -> ScoreResult``); with
    dynamic sampling, replace zero-variance groups by fresh prompts for up to max_sampling_rounds rounds."""
    group = config.rollout.group_size
    settings = config.settings
    wanted = settings.prompts_per_step
    prompts = prompt_order.step_rows(step)
    rng = random.Random(config.seed * 7_919 + step)
    drawn = {id(p) for p in prompts}  # refills draw prompts not yet in this step
    kept: list[tuple[PromptRow, list[Completion], ScoreResult]] = []
    spare: list[tuple[PromptRow, list[Completion], ScoreResult]] = []
    first_zero_frac = 0.0
    scored: list[ScoreResult] = []
    times["time/generate"] = times["time/reward"] = 0.0
    for round_index in range(settings.max_sampling_rounds if settings.dynamic_sampling else 1):
        t = time.perf_counter()
        round_sampling = replace(sampling, seed=sampling_seed(config.seed, step, round_index))
        completions = rollout.generate([p.prompt_ids for p in prompts], round_sampling)
        times["time/generate"] += time.perf_counter() - t
        t = time.perf_counter()
        expanded = [p for p in prompts for _ in range(group)]
        scores = score(expanded, completions)
        times["time/reward"] += time.perf_counter() - t
        scored.append(scores)
        flat = torch.tensor(scores.total)
        zero = zero_variance_groups(flat, group)
        if round_index == 0:
            first_zero_frac = float(zero.float().mean())
        for g, prompt in enumerate(prompts):
            entry = (prompt, completions[g * group:(g + 1) * group], _slice_scores(scores, g * group, (g + 1) * group))
            (spare if (settings.dynamic_sampling and zero[g]) else kept).append(entry)
        if len(kept) >= wanted:
            break
        # Oversample by the share of groups kept so far (DAPO samples a full batch per round).
        sampled = len(kept) + len(spare)
        needed = wanted - len(kept)
        fresh = [p for p in all_prompts if id(p) not in drawn]
        prompts = rng.sample(fresh, min(len(fresh), math.ceil(needed * sampled / max(len(kept), sampled / 4))))
        if not prompts:
            break
        drawn.update(id(p) for p in prompts)
    filled = kept[:wanted]
    unfilled = wanted - len(filled)
    filled += spare[:unfilled]  # out of rounds: keep zero-variance groups (advantage 0) to fill the step
    rows = [entry[0] for entry in filled for _ in range(group)]
    completions = [c for entry in filled for c in entry[1]]
    scores = merge_scores([entry[2] for entry in filled])
    # failure and timeout rates over everything scored this step (dropped groups included)
    stats = {k: v for k, v in merge_scores(scored).metrics().items() if k.endswith(("failure_rate", "timeout_rate"))}
    if group > 1:
        stats["groups/zero_variance_frac"] = first_zero_frac
    if settings.dynamic_sampling:
        stats["groups/unfilled"] = float(max(0, wanted - len(kept)))
    return Rollout(rows, completions, scores), stats


def sampling_seed(seed: int, step: int, round_index: int) -> int:
    """The sampling seed of one rollout round: a hash, so no two (step, round) pairs share per-prompt
    seeds (seeds that differ by small integers did: the engine adds the prompt index)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, round_index]).generate_state(1, np.uint32)[0] >> 1)


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


def _split(index: torch.Tensor, world: int, micro: int) -> list[list[torch.Tensor]]:
    """An optimizer step's row indices split over ranks, then into micro-batches of ``micro`` rows."""
    per_rank = len(index) // world
    return [[rows[m:m + micro] for m in range(0, len(rows), micro)]
            for rows in (index[r * per_rank:(r + 1) * per_rank] for r in range(world))]


def _rows(tokens, rows: torch.Tensor):
    from rayrl.data.batch import TokenBatch

    return TokenBatch(tokens.input_ids[rows], tokens.loss_mask[rows], tokens.position_ids[rows],
                      tokens.segment_ids[rows])


def _train(config: GRPOConfig | PPOConfig, trainers: TrainerGroup, objective: PolicyGradientObjective, tokens,
           advantages: torch.Tensor, old_logps: torch.Tensor, sampler_logps: torch.Tensor,
           ref_logps: torch.Tensor | None, overlong: torch.Tensor, step: int, *, critic: TrainerGroup | None = None,
           values: torch.Tensor | None = None, returns: torch.Tensor | None = None) -> dict[str, float]:
    """mini_batches x epochs optimizer steps; each splits its sequences over ranks and micro-batches.
    ``advantages`` are (N,) per sequence or (N, T-1) per token. With a critic (PPO), each mini-batch
    also takes one critic step of the clipped value loss towards ``returns``, alongside the policy's."""
    settings = config.settings
    total = tokens.input_ids.shape[0]
    per_step = config.sequences_per_optimizer_step
    world, micro = config.trainer.world_size, config.train.micro_batch_size
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    sums: dict[str, float] = {}
    count = 0
    critic_s = 0.0  # the critic's optimizer steps (PPO), wall time; they overlap the policy's
    for _ in range(settings.epochs):
        order = torch.randperm(total, generator=generator)
        for start in range(0, total, per_step):
            index = order[start:start + per_step]
            mask = tokens.loss_mask[index][:, 1:]
            if objective.overlong_filter:
                mask = mask & ~overlong[index][:, None]
            per_rank = [_trim([RolloutBatch(_rows(tokens, rows), advantages[rows], old_logps[rows], sampler_logps[rows],
                                            None if ref_logps is None else ref_logps[rows], overlong[rows])
                               for rows in rank_rows])
                        for rank_rows in _split(index, world, micro)]
            policy_step = trainers.start(
                "train_policy_gradient_step", per_rank,
                # max(1, .): a step whose every completion is filtered out trains on nothing (loss 0), not NaN
                global_num_tokens=max(1, int(mask.sum())), global_num_seqs=max(1, int((mask.sum(-1) > 0).sum())),
                objective=objective)
            if critic is not None:
                # The critic's step needs nothing from the policy's (values and returns are fixed for the
                # batch): both groups train at once.
                value_batches = [[_trim_values(ValueBatch(_rows(tokens, rows), values[rows], returns[rows]))
                                  for rows in rank_rows]
                                 for rank_rows in _split(index, config.critic.world_size, micro)]
                critic_start = time.perf_counter()
                critic_step = critic.start("train_value_step", value_batches,
                                           global_num_tokens=max(1, int(tokens.loss_mask[index][:, 1:].sum())))
            metrics = trainers.finish(policy_step)
            if critic is not None:
                value_metrics = critic.finish(critic_step)
                critic_s += time.perf_counter() - critic_start
                metrics.update({"critic/value_loss": value_metrics["loss"],
                                "critic/vf_clip_frac": value_metrics.get("vf_clip_frac", 0.0),
                                "critic/value_error": value_metrics.get("value_error", 0.0),
                                "critic/grad_norm": value_metrics["grad_norm"], "critic/lr": value_metrics["lr"],
                                "memory/critic_peak_rss_mb": value_metrics["memory/trainer_peak_rss_mb"]})
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
    out = {key: value / count for key, value in sums.items()}
    if critic is not None:
        out["time/train_critic"] = critic_s
    return out


def _trim(batches: list[RolloutBatch]) -> list[RolloutBatch]:
    """Cut each micro-batch's padding columns to its own longest row (less work per forward)."""
    from rayrl.data.batch import TokenBatch

    trimmed = []
    for batch in batches:
        width = int((batch.tokens.segment_ids > 0).sum(-1).max())
        tokens = TokenBatch(*(t[:, :width] for t in (batch.tokens.input_ids, batch.tokens.loss_mask,
                                                      batch.tokens.position_ids, batch.tokens.segment_ids)))
        advantages = batch.advantages if batch.advantages.dim() == 1 else batch.advantages[:, :width - 1]
        trimmed.append(RolloutBatch(tokens, advantages, batch.old_logps[:, :width - 1],
                                    batch.sampler_logps[:, :width - 1],
                                    None if batch.ref_logps is None else batch.ref_logps[:, :width - 1],
                                    batch.overlong))
    return trimmed


def _trim_values(batch: ValueBatch) -> ValueBatch:
    """A critic micro-batch cut to its own longest row, like ``_trim``."""
    from rayrl.data.batch import TokenBatch

    width = int((batch.tokens.segment_ids > 0).sum(-1).max())
    tokens = TokenBatch(*(t[:, :width] for t in (batch.tokens.input_ids, batch.tokens.loss_mask,
                                                  batch.tokens.position_ids, batch.tokens.segment_ids)))
    return ValueBatch(tokens, batch.old_values[:, :width - 1], batch.returns[:, :width - 1])
