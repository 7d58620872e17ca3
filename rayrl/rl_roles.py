"""The roles of an RL run (GRPO family, PPO): which actors exist, where they are placed, how they are
started and ended, and the driver-side calls the loop makes on them.

- ``RolloutPool``: the rollout workers (vLLM engines); prompts go to whichever worker is free.
- ``VerifierPool``: CPU actors running the reward functions; ``RewardModelPool``: PPO's reward models.
- ``RLRoles``: every actor of one run, with scoring, the log-prob and value passes (in row chunks),
  save/load/export of the trainable roles (the policy, and PPO's critic when there is one) and shutdown.
- ``start_roles`` creates them (colocated or split placement); ``role_resources`` says what they ask for.

It may call the actors (``rayrl.actors``), the trainer groups and the reward scoring; it knows nothing
of the loop's phases (``rayrl.rl``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch

from rayrl.actors.critic import FINAL_CRITIC_DIR
from rayrl.actors.engine import TrainerSpec
from rayrl.actors.reference_model import ReferenceModel
from rayrl.actors.reward_model import RewardModel
from rayrl.actors.rollout_worker import WORKER_CONCURRENCY_GROUPS, Completion, RolloutWorker, SamplingSettings
from rayrl.actors.verifier import Verifier
from rayrl.cluster import trainer_roles
from rayrl.config import GRPOConfig, PPOConfig, TimeoutConfig, policy_settings
from rayrl.data.batch import RowShards, TokenBatch
from rayrl.data.rollout import PromptRow
from rayrl.outputs import export_final_model
from rayrl.recovery import Call, CallStream, RestartingActors
from rayrl.remote import ActorIdentity, RemoteCallTimeout, RoleFailed, first_line
from rayrl.rewards.scoring import RewardSpec, ScoreResult
from rayrl.stage_common import trainer_spec
from rayrl.tiny import resolve_model_path
from rayrl.trainer_group import CriticGroup, PolicyTrainerGroup

_log = logging.getLogger(__name__)

CRITIC_CHECKPOINT_DIR = "critic"  # inside each checkpoint directory


@dataclass(frozen=True)
class ScoredRound:
    """One round's completions (prompt-major) and scores, and what generating and scoring them took."""

    completions: list[Completion]
    scores: ScoreResult
    generate_s: float  # until the last chunk was generated
    score_s: float  # summed over the chunks' scoring calls (they overlap the generation of the others)


def timed_score(score: Callable[[list[PromptRow], list[Completion]], ScoreResult], rows: list[PromptRow],
                completions: list[Completion]) -> tuple[ScoreResult, float]:
    """``score(rows, completions)`` and the seconds it took (a chunk's scoring, on a scoring thread)."""
    start = time.perf_counter()
    return score(rows, completions), time.perf_counter() - start


class RolloutPool:
    """Rollout workers; prompts are handed out in chunks to whichever worker is free (balanced by
    pending work), and weights are pushed to all of them. Every call has a deadline
    (``fault.timeouts``): a generate call's grows with the tokens it may generate. A worker that dies
    or misses its deadline is restarted and its chunk re-issued (``rayrl.recovery``); the chunk's
    sampling seed goes with it, so the re-issued samples are the ones the lost worker would have drawn."""

    def __init__(self, actors: RestartingActors, timeouts: TimeoutConfig,
                 per_worker: dict[str, float] | None = None):
        """``per_worker``: the Ray resources one worker asks for (``resize`` checks they are free)."""
        self.actors = actors
        self.timeouts = timeouts
        self.per_worker = {k: v for k, v in (per_worker or {}).items() if v > 0}

    def resize(self, count: int) -> str:
        """Grow or shrink to ``count`` workers between steps (``rayrl scale``); says what it did. A pool
        the cluster has no room to grow stays as it is."""
        added = count - len(self.workers)
        if added > 0:
            free = ray.available_resources()
            short = {k: v * added for k, v in self.per_worker.items() if free.get(k, 0.0) < v * added - 1e-9}
            if short:
                return (f"rollout.num_workers={count} asked for, but the cluster has no room for {added} more "
                        f"worker(s) (needs {short}, free {({k: free.get(k, 0.0) for k in short})}); "
                        f"keeping {len(self.workers)}")
        before = len(self.workers)
        try:
            self.actors.resize(count)
        except (RoleFailed, RemoteCallTimeout) as error:
            return f"rollout.num_workers={count} asked for, but a new worker failed to start ({first_line(error)}); " \
                   f"keeping {len(self.workers)}"
        return f"rollout workers: {before} -> {count}"

    @property
    def workers(self) -> list:
        return self.actors.actors

    @property
    def who(self) -> list[ActorIdentity]:
        return self.actors.who

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        bounds = self.chunk_bounds(len(prompt_ids))
        parts = self.actors.map([self.generate_call(prompt_ids, start, stop, sampling) for start, stop in bounds])
        return self.assemble(list(zip((start for start, _ in bounds), parts)), len(prompt_ids), sampling.n)

    def generate_scored(self, prompt_ids: list[list[int]], sampling: SamplingSettings, rows: list[PromptRow],
                        score: Callable[[list[PromptRow], list[Completion]], ScoreResult]) -> ScoredRound:
        """``generate``, each chunk scored (``score(rows of the chunk, its completions)``, on one thread) as
        soon as it is generated, while the other chunks generate. ``rows``: one per completion."""
        bounds = self.chunk_bounds(len(prompt_ids))
        per_prompt = len(rows) // len(prompt_ids)
        stream = CallStream(self.actors)
        for start, stop in bounds:
            stream.add(self.generate_call(prompt_ids, start, stop, sampling), (start, stop))
        started = time.perf_counter()
        parts: dict[int, list[Completion]] = {}
        scoring: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-scoring") as scorer:
            while stream.unfinished:
                for (start, stop), completions in stream.wait():
                    parts[start] = completions
                    scoring[start] = scorer.submit(timed_score, score, rows[start * per_prompt:stop * per_prompt],
                                                   completions)
            generated = time.perf_counter()
            scored = [scoring[start].result() for start, _ in bounds]
        completions = self.assemble([(start, parts[start]) for start, _ in bounds], len(prompt_ids), sampling.n)
        return ScoredRound(completions, ScoreResult.concat([result for result, _ in scored]),
                           generate_s=generated - started, score_s=sum(seconds for _, seconds in scored))

    def chunk_bounds(self, num_prompts: int) -> list[tuple[int, int]]:
        """[start, stop) prompt ranges of one generate round: two chunks per worker, so a worker that
        finishes early takes more."""
        chunk = max(1, -(-num_prompts // (2 * len(self.workers))))
        return [(start, min(num_prompts, start + chunk)) for start in range(0, num_prompts, chunk)]

    def generate_call(self, prompt_ids: list[list[int]], start: int, stop: int, sampling: SamplingSettings,
                      min_version: int | None = None) -> Call:
        """The call that samples prompts [start, stop) of a round; per-request seeds count from
        ``start``, so the samples do not depend on how a round is cut into chunks or which worker runs one.
        ``min_version``: the oldest policy version that may start it (``RolloutWorker.generate``)."""
        chunk, chunk_sampling = prompt_ids[start:stop], replace(sampling, seed_offset=start)
        oldest = {} if min_version is None else {"min_version": min_version}
        return Call(lambda worker: worker.generate.remote(chunk, chunk_sampling, **oldest),
                    deadline_s=self.generate_deadline_s(stop - start, sampling),
                    doing=f"generating (prompts {start}...)")

    @staticmethod
    def assemble(parts: list[tuple[int, list[Completion]]], num_prompts: int, n: int) -> list[Completion]:
        """One round's completions from its chunks' (start, completions), prompt-major, checked to hold
        one completion per (prompt, sample)."""
        results: list[Completion] = []
        for start, part in parts:
            for completion in part:
                completion.prompt_index += start
                results.append(completion)
        results.sort(key=lambda c: (c.prompt_index, c.sample_index))
        expected = [(p, s) for p in range(num_prompts) for s in range(n)]
        if [(c.prompt_index, c.sample_index) for c in results] != expected:
            raise RuntimeError(f"the rollout workers returned {len(results)} completions for {num_prompts} "
                               f"prompts x {n} samples, not one per (prompt, sample)")
        return results

    def generate_deadline_s(self, num_prompts: int, sampling: SamplingSettings) -> float:
        tokens = num_prompts * sampling.n * sampling.max_new_tokens
        return self.timeouts.generate_s + self.timeouts.generate_per_token_s * tokens

    def sleep(self) -> None:
        self.actors.call_all(lambda worker: worker.sleep.remote(), "going to sleep", self.timeouts.sync_s)

    def wake_up(self) -> None:
        self.actors.call_all(lambda worker: worker.wake_up.remote(), "waking up", self.timeouts.sync_s)


class VerifierPool:
    """Verifier actors; a batch is split into equal contiguous slices over them. A call's deadline is
    ``fault.timeouts.score_s`` plus the rewards' per-item timeouts times its items; a verifier that
    dies or misses it is restarted and its slice re-scored."""

    def __init__(self, actors: RestartingActors, timeouts: TimeoutConfig, per_item_s: float):
        self.actors = actors
        self.timeouts = timeouts
        self.per_item_s = per_item_s

    def score(self, prompts: list[str], completions: list[str], fields: list[dict]) -> ScoreResult:
        size = -(-len(prompts) // len(self.actors))
        return ScoreResult.concat(self.actors.map([
            Call(lambda verifier, i=i: verifier.score.remote(prompts[i:i + size], completions[i:i + size],
                                                             fields[i:i + size]),
                 deadline_s=self.timeouts.score_s + self.per_item_s * size,
                 doing=f"scoring completions {i}-{min(len(prompts), i + size) - 1}")
            for i in range(0, len(prompts), size)]))


def balanced_slices(lengths: list[int], parts: int) -> list[tuple[int, int]]:
    """Split items (kept in order) into at most ``parts`` contiguous [start, stop) slices of about
    equal total length (tokens), so each reward-model worker gets a similar amount of work."""
    if not lengths:
        return []
    parts = max(1, min(parts, len(lengths)))
    total = sum(lengths)
    slices, start, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        remaining_items = len(lengths) - (i + 1)
        remaining_parts = parts - len(slices) - 1
        if remaining_parts > 0 and (acc >= total * (len(slices) + 1) / parts or remaining_items == remaining_parts):
            slices.append((start, i + 1))
            start = i + 1
    slices.append((start, len(lengths)))
    return [s for s in slices if s[0] < s[1]]


class RewardModelPool:
    """Several RewardModel actors; a batch is split into token-balanced contiguous slices over them
    (a failed actor is restarted and its slice re-scored)."""

    def __init__(self, actors: RestartingActors, timeouts: TimeoutConfig):
        self.actors = actors
        self.timeouts = timeouts

    def score(self, sequences: list[list[int]]) -> list[float]:
        slices = balanced_slices([len(s) for s in sequences], len(self.actors))
        parts = self.actors.map([Call(lambda worker, a=a, b=b: worker.score.remote(sequences[a:b]),
                                      deadline_s=self.timeouts.score_s, doing=f"scoring sequences {a}-{b - 1}")
                                 for a, b in slices])
        return [v for part in parts for v in part]


@dataclass
class RLRoles:
    """Every actor of one RL run. Colocated: rollout worker i shares trainer rank i's bundle (and
    sleeps while it trains)."""

    trainers: PolicyTrainerGroup
    rollout: RolloutPool
    colocated: bool
    verifiers: VerifierPool | None = None
    reward_models: RewardModelPool | None = None
    critic: CriticGroup | None = None
    reference: RestartingActors | None = None  # a ReferenceModel actor (none with PEFT: the adapter-disabled policy is it)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    start_trainers: Callable[[], PolicyTrainerGroup] | None = None  # a fresh policy group (restart_trainers)
    start_critic: Callable[[], CriticGroup] | None = None

    # ---- the loop's calls --------------------------------------------------------------------
    def score(self, rows: list[PromptRow], completions: list[Completion]) -> ScoreResult:
        """Verifier rewards (GRPO) or reward-model scores plus any verifier rewards (PPO)."""
        verified = None
        if self.verifiers is not None:
            verified = self.verifiers.score([p.prompt for p in rows], [c.text for c in completions],
                                            [p.fields for p in rows])
        if self.reward_models is None:
            return verified
        modelled = ScoreResult.from_reward("reward_model", self.reward_models.score(
            [p.prompt_ids + c.token_ids for p, c in zip(rows, completions)]))
        return modelled if verified is None else modelled.plus(verified)

    def policy_logprobs(self, tokens: TokenBatch, micro_batch_size: int, temperature: float) -> torch.Tensor:
        """(N, T-1) the trainer's token log-probs (before any update: the ratio's denominator), at the
        sampling temperature, as the engine's are."""
        return self.trainers.token_logprobs(tokens, micro_batch_size=micro_batch_size, temperature=temperature)

    def reference_logprobs(self, tokens: TokenBatch, micro_batch_size: int, temperature: float) -> torch.Tensor:
        """(N, T-1) the reference's token log-probs (the ReferenceModel actor, or with PEFT the
        adapter-disabled policy), at the sampling temperature."""
        if self.reference is not None:  # a pool: each worker a shard, in one call
            shards = RowShards.split(tokens, len(self.reference.actors), micro_batch_size, equal_forwards=False)
            return shards.stitch(self.reference.map([
                Call(lambda reference, batches=shards.micro_batches(i): reference.token_logprobs.remote(
                    batches, temperature=temperature), deadline_s=self.timeouts.trainer_s,
                    doing=f"computing the reference's log-probs (shard {i + 1} of {len(shards.rows)})")
                for i in range(len(shards.rows))]))
        return self.trainers.token_logprobs(tokens, micro_batch_size=micro_batch_size, temperature=temperature,
                                            reference=True)

    def pause_engines(self) -> None:
        """Colocated: the engines sleep while the trainer trains (on GPUs they hand back their memory)."""
        if self.colocated:
            self.rollout.sleep()

    def resume_engines(self) -> None:
        if self.colocated:
            self.rollout.wake_up()

    # ---- the trainable roles' state ------------------------------------------------------------
    def restart_trainers(self) -> None:
        """End the policy (and critic) groups, one of whose ranks failed, and start fresh ones (with
        the initial weights: the caller loads a checkpoint into them). Colocated, the rollout workers
        start again too, in the new group's bundles, with the initial weights (the caller pushes)."""
        for group in (self.trainers, self.critic):
            if group is not None:
                try:
                    group.abandon()
                except Exception as error:  # noqa: BLE001 - a dead rank's group ends as far as it can
                    _log.warning("ending the failed trainer group: %r", error)
        assert self.start_trainers is not None, "start_roles sets how to start the trainers"
        self.trainers = self.start_trainers()
        if self.critic is not None and self.start_critic is not None:
            self.critic = self.start_critic()
        if self.colocated:  # the workers lived in the old group's bundles: new ones in the new group's
            self.rollout.actors.start_all_again()

    def trainer_failed(self, failure: Exception) -> bool:
        """Whether ``failure`` names a policy or critic rank."""
        roles = {PolicyTrainerGroup.role.__name__, CriticGroup.role.__name__}
        return any(who.role in roles for who in getattr(failure, "who", ()))

    def save_checkpoint(self, directory: Path) -> None:
        self.trainers.save_checkpoint(str(directory))
        if self.critic is not None:
            self.critic.save_checkpoint(str(directory / CRITIC_CHECKPOINT_DIR))

    def load_checkpoint(self, directory: Path) -> None:
        self.trainers.load_checkpoint(str(directory))
        if self.critic is not None:
            self.critic.load_checkpoint(str(directory / CRITIC_CHECKPOINT_DIR))

    def export(self, tokenizer, output_dir: Path) -> Path:
        """The policy as ``output_dir/final`` and, with a critic (PPO), the value model as
        ``output_dir/final_critic``; returns the policy's directory."""
        final_model = export_final_model(self.trainers, tokenizer, output_dir)
        if self.critic is not None:
            export_final_model(self.critic, tokenizer, output_dir, FINAL_CRITIC_DIR)
        return final_model

    # ---- bookkeeping -------------------------------------------------------------------------
    def actors_by_role(self) -> dict[str, list]:
        return {"trainer": self.trainers.actors, "rollout": self.rollout.workers,
                **{role.role: role.actors for role in self.stateless()},
                "critic": self.critic.actors if self.critic is not None else []}

    def stateless(self) -> list[RestartingActors]:
        """The roles that are restarted when an actor fails (rollout, verifier, reward model, reference)."""
        return [self.rollout.actors] + [pool.actors for pool in (self.verifiers, self.reward_models) if pool is not None] \
            + ([self.reference] if self.reference is not None else [])

    def fault_metrics(self) -> dict[str, float]:
        """``faults/<role>/restarts`` and ``faults/<role>/reissued``, counted since the run started."""
        return {key: value for role in self.stateless() for key, value in role.metrics().items()}

    def shutdown(self) -> None:
        """Release the process groups, then end every actor (also on an existing, shared cluster).
        Best effort: a role that fails to stop (e.g. a dead rank) is reported and the rest still end."""
        steps = [self.trainers.shutdown]
        if self.critic is not None:
            steps.append(self.critic.shutdown)
        for name, actors in self.actors_by_role().items():
            if name not in ("trainer", "critic"):
                steps.extend(lambda actor=actor: ray.kill(actor) for actor in actors)
        for step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - keep ending the other roles
                _log.warning("shutting down an RL role failed: %r", error)


def role_resources(config: GRPOConfig | PPOConfig) -> dict[str, tuple[float, float]]:
    """CPUs and GPUs each role asks for (colocated rollout workers add to the trainer's bundles)."""
    roles = trainer_roles(config)
    rollout = config.rollout
    # Colocated, every trainer rank's bundle reserves one worker's share, used or not.
    slots = config.trainer.world_size if config.placement == "colocated" else rollout.num_workers
    roles["rollout"] = (slots * rollout.num_cpus, slots * rollout.num_gpus)
    if config.rewards:
        roles["verifier"] = (config.verifier.num_workers * config.verifier.num_cpus, 0.0)
    if isinstance(config, PPOConfig):
        rm, critic = config.reward_model, config.critic
        roles["reward_model"] = (rm.num_workers * rm.num_cpus, rm.num_workers * rm.num_gpus)
        roles["critic"] = (critic.world_size * critic.num_cpus, critic.world_size * critic.num_gpus)
    if needs_reference_model(config):
        ref = config.reference
        roles["reference"] = (ref.num_workers * ref.num_cpus, ref.num_workers * ref.num_gpus)
    return roles


def fit_unset_cpus(config: GRPOConfig | PPOConfig, cpus: float) -> tuple[GRPOConfig | PPOConfig, str | None]:
    """``config`` with the CPU requests the user left at their defaults scaled down, together, so that
    all roles fit ``cpus`` (the embedded cluster's), and a line saying so; ``config`` and None when they
    fit already or every request was set (then the cluster check names what does not fit). Ray's CPU
    requests are scheduling units: a role still runs at least one thread."""
    requests = {role: cpus_asked for role, (cpus_asked, _) in role_resources(config).items()}
    unset = [role for role, asked in requests.items()
             if asked > 0 and "num_cpus" not in getattr(config, role).model_fields_set]
    if sum(requests.values()) <= cpus + 1e-9 or not unset:
        return config, None
    room = max(0.0, cpus - sum(asked for role, asked in requests.items() if role not in unset))
    factor = room / sum(requests[role] for role in unset)
    fitted = {role: math.floor(getattr(config, role).num_cpus * factor * 100) / 100 for role in unset}
    changed = config.model_copy(update={role: getattr(config, role).model_copy(update={"num_cpus": value})
                                        for role, value in fitted.items()})
    said = ", ".join(f"{role}.num_cpus {getattr(config, role).num_cpus:g} -> {value:g}" for role, value in fitted.items())
    return changed, (f"the roles' default CPU requests ({sum(requests.values()):g}) exceed this machine's {cpus:g} "
                     f"CPUs: {said} (set them to choose)")


def needs_reference_model(config: GRPOConfig | PPOConfig) -> bool:
    """A KL term needs reference log-probs; with PEFT the adapter-disabled policy gives them."""
    return bool(policy_settings(config).kl_coef) and config.model.peft is None


def critic_spec(config: PPOConfig, model_path: str, optimizer_steps: int) -> TrainerSpec:
    """The policy's engine settings with the critic section's own lr, world size and DeepSpeed settings."""
    return replace(trainer_spec(config, model_path, optimizer_steps), world_size=config.critic.world_size,
                   grad_accum_steps=config.critic_grad_accum_steps, lr=config.critic.lr,
                   zero_stage=config.critic.zero_stage, deepspeed_overrides=config.critic.deepspeed,
                   peft=config.critic.peft, num_threads=max(1, int(config.critic.num_cpus)),
                   packing=config.train.packing)


def start_roles(config: GRPOConfig | PPOConfig, model_path: str, specs: list[RewardSpec], pad_id: int) -> RLRoles:
    """Create every role's actors; if one fails to start, those already started are ended."""
    colocated = config.placement == "colocated"
    shared = ({"CPU": config.rollout.num_cpus, "GPU": config.rollout.num_gpus, **config.rollout.resources}
              if colocated else None)
    optimizer_steps = config.schedule_steps  # the LR schedule spans every optimizer step
    timeouts = config.fault.timeouts

    def stateless(role: str, start_actor: Callable[[int], Any], count: int, setting: str) -> RestartingActors:
        return RestartingActors(role, start_actor, count, max_restarts=config.fault.max_restarts,
                                startup_s=timeouts.startup_s, setting=setting)

    spec = replace(trainer_spec(config, model_path, optimizer_steps), packing=config.train.packing)
    if colocated:  # the rank and its bundle's rollout worker take turns: the rank trains on all the bundle's CPUs
        spec = replace(spec, num_threads=max(1, int(config.trainer.num_cpus + config.rollout.num_cpus)))

    def start_trainers() -> PolicyTrainerGroup:
        return PolicyTrainerGroup(spec, num_cpus=config.trainer.num_cpus,
                                  num_gpus=config.trainer.num_gpus, shared_bundle=shared,
                                  resources=config.trainer.resources, timeouts=timeouts)

    roles = RLRoles(start_trainers(), RolloutPool(stateless("rollout", lambda i: None, 0, ""), timeouts), colocated,
                    timeouts=timeouts, start_trainers=start_trainers)
    try:
        roles.rollout = RolloutPool(stateless(
            "rollout", _rollout_worker_starter(config, model_path, (lambda: roles.trainers) if colocated else None),
            config.rollout.num_workers, "fault.timeouts.generate_s + generate_per_token_s"), timeouts,
            per_worker={"CPU": config.rollout.num_cpus, "GPU": config.rollout.num_gpus, **config.rollout.resources})
        if specs:
            per_item_s = sum(spec.timeout_s or 0.0 for spec in specs)
            roles.verifiers = VerifierPool(stateless(
                "verifier", lambda i: _verifier(config, specs), config.verifier.num_workers,
                "fault.timeouts.score_s (plus rewards[i].timeout_s per item)"), timeouts, per_item_s)
        if isinstance(config, PPOConfig):
            rm_path = resolve_model_path(config.reward_model.path)
            roles.reward_models = RewardModelPool(stateless(
                "reward_model", lambda i: _reward_model(config, rm_path, pad_id), config.reward_model.num_workers,
                "fault.timeouts.score_s"), timeouts)
            critic_path = rm_path if config.critic.init == "reward_model" else model_path

            def start_critic() -> CriticGroup:
                return CriticGroup(critic_spec(config, critic_path, optimizer_steps),
                                   num_cpus=config.critic.num_cpus, num_gpus=config.critic.num_gpus,
                                   resources=config.critic.resources, timeouts=timeouts,
                                   role_kwargs={"value_clip": config.critic.value_clip})

            roles.critic, roles.start_critic = start_critic(), start_critic
        if needs_reference_model(config):
            roles.reference = stateless("reference", lambda i: _reference_model(config, model_path),
                                        config.reference.num_workers,
                                        "fault.timeouts.trainer_s")
    except BaseException:
        roles.shutdown()
        raise
    return roles


def _rollout_worker_starter(config: GRPOConfig | PPOConfig, model_path: str,
                            colocate_with: Callable[[], PolicyTrainerGroup] | None) -> Callable[[int], Any]:
    """Starts rollout worker ``i`` (colocated: in rank i's bundle of the trainer group ``colocate_with()``
    returns, the current one after a rebuild), first or after a failure."""

    def start(i: int):
        options: dict[str, Any] = {"num_cpus": config.rollout.num_cpus, "num_gpus": config.rollout.num_gpus,
                                   "resources": dict(config.rollout.resources)}
        strategy = colocate_with().bundle_strategy(i) if colocate_with is not None else None
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        # Partial rollouts: pushes arrive beside a generate in flight (Ray takes the groups only here).
        worker_class = (ray.remote(concurrency_groups=WORKER_CONCURRENCY_GROUPS)(RolloutWorker)
                        if config.rollout.partial_rollouts else ray.remote(RolloutWorker))
        return worker_class.options(**options).remote(
            model_path, backend=config.rollout.backend, dtype=config.rollout.dtype, seed=config.seed + i,
            kv_cache_gib=config.rollout.kv_cache_gib, num_threads=max(1, int(config.rollout.num_cpus)),
            partial_rollouts=config.rollout.partial_rollouts,
            lora_rank=config.model.peft.r if config.rollout.lora_sync == "adapter" else None,
            lora_target_modules=(config.model.peft.target_modules if config.rollout.lora_sync == "adapter"
                                 and isinstance(config.model.peft.target_modules, list) else None),
            # Colocated on GPUs the engine gives its weights and KV cache back while the trainer trains.
            enable_sleep_mode=colocate_with is not None and config.rollout.num_gpus > 0)

    return start


def _verifier(config: GRPOConfig | PPOConfig, specs: list[RewardSpec]):
    return ray.remote(Verifier).options(num_cpus=config.verifier.num_cpus,
                                        resources=dict(config.verifier.resources)).remote(specs, base_dir=os.getcwd())


def _reward_model(config: PPOConfig, path: str, pad_id: int):
    section = config.reward_model
    return ray.remote(RewardModel).options(num_cpus=section.num_cpus, num_gpus=section.num_gpus,
                                           resources=dict(section.resources)).remote(
        path, pad_token_id=pad_id, num_threads=max(1, int(section.num_cpus)), batch_size=config.train.micro_batch_size)


def _reference_model(config: GRPOConfig | PPOConfig, model_path: str):
    section = config.reference
    return ray.remote(ReferenceModel).options(num_cpus=section.num_cpus, num_gpus=section.num_gpus,
                                              resources=dict(section.resources)).remote(
        model_path, num_threads=max(1, int(section.num_cpus)), packing=config.train.packing)
