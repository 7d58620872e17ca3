"""Trainer groups: the N ranks of one trainable role, one Ray actor each, in one placement group.

Each role gets its own group type offering only the calls its loops make, each a typed method:
``PolicyTrainerGroup`` (SFT, DPO family, GRPO/PPO policy), ``CriticGroup`` (PPO's value model) and
``RewardTrainerGroup`` (the rm stage). DeepSpeed's collectives need every rank in every call, so each
method calls all ranks and returns rank 0's answer (or the ranks' metrics combined).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrl.actors.critic import Critic
from rayrl.actors.engine import TrainerRank, TrainerSpec
from rayrl.actors.policy_trainer import PolicyTrainer
from rayrl.actors.reward_trainer import RewardModelTrainer
from rayrl.data.batch import RowShards, TokenBatch
from rayrl.data.preference import KTOBatch, PreferenceBatch
from rayrl.data.rollout import RolloutBatch, ValueBatch
from rayrl.config import TimeoutConfig
from rayrl.objectives import PolicyGradientObjective, PreferenceObjective
from rayrl.remote import ActorIdentity, RemoteCallTimeout, RoleFailed, gather, identify
from rayrl.weight_sync import ExportedWeights

Rank = TypeVar("Rank", bound=TrainerRank)

PLACEMENT_TIMEOUT_S = 300


@dataclass(frozen=True)
class PendingStep:
    """An optimizer step started on every rank of a group; ``wait`` gives the ranks' metrics combined
    (within the group's deadline). Lets two groups (PPO's policy and critic) train at once."""

    refs: list
    who: list[ActorIdentity]
    doing: str
    deadline_s: float

    def wait(self) -> dict[str, float]:
        return combine_rank_metrics(gather(self.refs, who=self.who, doing=self.doing, deadline_s=self.deadline_s,
                                           setting="fault.timeouts.trainer_s"))


def contiguous_shares(count: int, world_size: int) -> list[range]:
    """Indices 0..count-1 split into ``world_size`` contiguous shares, the first ones one longer."""
    base, extra = divmod(count, world_size)
    starts = [rank * base + min(rank, extra) for rank in range(world_size + 1)]
    return [range(starts[rank], starts[rank + 1]) for rank in range(world_size)]


def padded_shares(batches: list, world_size: int) -> list[tuple[list, int]]:
    """Per rank, its contiguous share of ``batches`` topped up with copies of the first to the same
    count on every rank (ZeRO-3 gathers parameters collectively), and how many of them are padding."""
    shares = contiguous_shares(len(batches), world_size)
    forwards = max(len(share) for share in shares)
    return [([batches[i] for i in share] + [batches[0]] * (forwards - len(share)), forwards - len(share))
            for share in shares]


def combine_rank_metrics(results: list[dict]) -> dict[str, float]:
    """Loss and stats are per-rank shares of global means: sum them. Norm and LR agree on all ranks;
    times and memory are the slowest / largest rank's."""
    combined = {key: sum(r[key] for r in results) for key in results[0]
                if key not in ("grad_norm", "lr", "peak_rss_mb") and not key.startswith("time/")}
    combined.update({key: max(r[key] for r in results) for key in results[0] if key.startswith("time/")})
    combined.update(grad_norm=results[0]["grad_norm"], lr=results[0]["lr"])
    combined["memory/trainer_peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    return combined


class _TrainerGroup(Generic[Rank]):
    """What every trainer group shares: placement, rendezvous, checkpoints, export and shutdown.

    The fan-out helpers take a callable ``(actor, rank) -> ObjectRef`` (e.g.
    ``lambda actor, rank: actor.save_checkpoint.remote(directory)``), never a method name."""

    role: type[Rank]

    def __init__(self, spec: TrainerSpec, *, num_cpus: float, num_gpus: float, timeouts: TimeoutConfig,
                 separate_reference: bool = False, role_kwargs: dict[str, Any] | None = None,
                 shared_bundle: dict[str, float] | None = None, resources: dict[str, float] | None = None):
        """``shared_bundle``: extra resources added to every rank's bundle, for actors the caller
        co-locates with the ranks (``bundle_strategy``), e.g. rollout workers sharing a GPU.
        ``resources``: custom Ray resources each rank asks for (pins ranks to node groups).
        ``timeouts``: the deadlines of the calls to the ranks (``fault.timeouts``)."""
        self.spec = spec
        self.timeouts = timeouts
        self.who: list[ActorIdentity] = []
        extra = shared_bundle or {}
        resources = dict(resources or {})
        bundle = {key: value for key, value in (("CPU", num_cpus + extra.get("CPU", 0.0)),
                                                ("GPU", num_gpus + extra.get("GPU", 0.0))) if value > 0}
        for key, value in [*resources.items(), *extra.items()]:
            if key not in ("CPU", "GPU"):
                bundle[key] = bundle.get(key, 0.0) + value
        self.placement_group = None
        self.actors: list = []
        try:
            options: list[dict[str, Any]] = [{} for _ in range(spec.world_size)]
            if bundle:
                self.placement_group = placement_group([bundle] * spec.world_size, strategy="PACK")
                ray.get(self.placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
                options = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i)} for i in range(spec.world_size)]
            remote_cls = ray.remote(self.role)
            self.actors = [
                remote_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, **options[rank]).remote(
                    spec, rank, **(role_kwargs or {}))
                for rank in range(spec.world_size)
            ]
            self.who = [ActorIdentity(self.role.__name__, rank) for rank in range(spec.world_size)]
            self._setup(separate_reference)
        except BaseException:
            self._release()  # a rank that failed to start (or a bundle never placed) leaks nothing
            raise

    @property
    def world_size(self) -> int:
        return len(self.actors)

    # ---- fan-out (private: the typed methods below are the interface) ----------------------------
    def _start(self, call: Callable[[Any, int], Any]) -> list:
        """``call(actor, rank)`` on every rank, not waiting: the refs."""
        return [call(actor, rank) for rank, actor in enumerate(self.actors)]

    def _all(self, call: Callable[[Any, int], Any], doing: str) -> list:
        """``call(actor, rank)`` on every rank; every rank's result, within ``fault.timeouts.trainer_s``."""
        return gather(self._start(call), who=self.who, doing=doing, deadline_s=self.timeouts.trainer_s,
                      setting="fault.timeouts.trainer_s")

    def _rank0(self, call: Callable[[Any, int], Any], doing: str) -> Any:
        """``call(actor, rank)`` on every rank (collectives need them all); rank 0's result."""
        return self._all(call, doing)[0]

    def _pending(self, call: Callable[[Any, int], Any], doing: str) -> PendingStep:
        return PendingStep(self._start(call), self.who, doing, self.timeouts.trainer_s)

    def _setup(self, separate_reference: bool) -> None:
        self.who = identify(self.role.__name__, self.actors, self.timeouts.startup_s)

        def starting(refs: list, who: list[ActorIdentity]) -> list:
            return gather(refs, who=who, doing="starting up", deadline_s=self.timeouts.startup_s,
                          setting="fault.timeouts.startup_s")

        master_addr, master_port = starting([self.actors[0].address.remote()], self.who[:1])[0]
        ips = starting([actor.node_ip.remote() for actor in self.actors], self.who)
        per_node = Counter(ips)
        seen: Counter[str] = Counter()
        local_ranks = []
        for ip in ips:
            local_ranks.append(seen[ip])
            seen[ip] += 1
        self.setup_info = starting(self._start(lambda actor, rank: actor.setup.remote(
            master_addr, master_port, local_ranks[rank], per_node[ips[rank]], separate_reference=separate_reference)),
            self.who)

    # ---- what every trainable role offers ----------------------------------------------------
    def bundle_strategy(self, rank: int):
        """A scheduling strategy that places an actor in rank ``rank``'s bundle (co-location)."""
        if self.placement_group is None:
            return None
        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)

    def param_group_lrs(self) -> list[dict]:
        return self._rank0(lambda actor, rank: actor.param_group_lrs.remote(), "reading the learning rates")

    def save_checkpoint(self, directory: str) -> None:
        self._all(lambda actor, rank: actor.save_checkpoint.remote(directory), f"saving a checkpoint to {directory}")

    def load_checkpoint(self, directory: str) -> None:
        self._all(lambda actor, rank: actor.load_checkpoint.remote(directory), f"loading the checkpoint {directory}")

    def export_hf(self, directory: str) -> None:
        self._all(lambda actor, rank: actor.export_hf.remote(directory), f"exporting the model to {directory}")

    def shutdown(self) -> None:
        try:
            self._all(lambda actor, rank: actor.shutdown.remote(), "shutting down")
        except (RoleFailed, RemoteCallTimeout):
            pass  # best effort: the actors are killed below either way
        finally:
            self._release()

    def abandon(self) -> None:
        """End the ranks without asking them (one died; the others may wait in a collective forever)."""
        self._release()

    def _release(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


class PolicyTrainerGroup(_TrainerGroup[PolicyTrainer]):
    """The policy's ranks: SFT, the DPO family, and the policy of GRPO/PPO."""

    role = PolicyTrainer

    def train_sft_step(self, batches: list[list[TokenBatch]], global_num_tokens: int) -> dict[str, float]:
        """``batches[rank]`` are that rank's micro-batches. Returns the global-batch loss and stats."""
        return combine_rank_metrics(self._all(lambda actor, rank: actor.train_sft_step.remote(
            batches[rank], global_num_tokens=global_num_tokens), "an SFT step"))

    def train_preference_step(self, batches: list[list[PreferenceBatch]] | list[list[KTOBatch]],
                              global_num_examples: int, objective: PreferenceObjective) -> dict[str, float]:
        return combine_rank_metrics(self._all(lambda actor, rank: actor.train_preference_step.remote(
            batches[rank], global_num_examples=global_num_examples, objective=objective), "a preference step"))

    def start_policy_gradient_step(self, batches: list[list[RolloutBatch]], *, global_num_tokens: int,
                                   global_num_seqs: int, objective: PolicyGradientObjective) -> PendingStep:
        """One optimizer step of the policy-gradient loss, started on every rank (``batches[rank]``)."""
        return self._pending(lambda actor, rank: actor.train_policy_gradient_step.remote(
            batches[rank], global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
            objective=objective), "a policy-gradient step")

    def token_logprobs(self, batch: TokenBatch, *, micro_batch_size: int, temperature: float = 1.0,
                       reference: bool = False) -> torch.Tensor:
        """(B, T-1) next-token log-probs under the current weights (or, with PEFT, the reference's); each
        rank computes its shard of the rows (one call per rank); 0 past each row's micro-batch's width."""
        shards = RowShards.split(batch, self.world_size, micro_batch_size)
        return shards.stitch(self._all(lambda actor, rank: actor.token_logprobs.remote(
            shards.micro_batches(rank), reference=reference, temperature=temperature),
            "computing the reference's log-probs" if reference else "computing log-probs"))

    def sequence_logprobs(self, batches: list[TokenBatch], *, reference: bool = False) -> torch.Tensor:
        """The batches' rows' summed log-probs of their target tokens, in order; each rank computes a
        contiguous share of the batches (padded with dropped forwards to the same number, for ZeRO-3)."""
        shares = padded_shares(batches, self.world_size)
        results = self._all(lambda actor, rank: actor.sequence_logprobs.remote(shares[rank][0], reference=reference),
                            "computing sequence log-probs")
        return torch.cat([part for (share, padding), result in zip(shares, results, strict=True)
                          for part in result[:len(share) - padding]])

    def eval_preference(self, batches: list[PreferenceBatch] | list[KTOBatch],
                        objective: PreferenceObjective) -> dict[str, float]:
        return self._rank0(lambda actor, rank: actor.eval_preference.remote(batches, objective), "evaluating")

    def eval_loss(self, batches: list[TokenBatch]) -> float:
        """Token-mean NLL; each rank evaluates a contiguous share of the batches, padded with uncounted
        forwards to the same number (ZeRO-3 gathers parameters collectively)."""
        shares = padded_shares(batches, self.world_size)
        results = self._all(lambda actor, rank: actor.eval_loss.remote(shares[rank][0], padding=shares[rank][1]),
                            "evaluating the loss")
        return sum(total for total, _ in results) / max(sum(count for _, count in results), 1)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                 stop_ids: list[int]) -> list[list[int]]:
        """Greedy completions; each rank generates a contiguous share of the prompts (a rank without
        one generates for the first prompt and drops it: under ZeRO-3 every rank must take part)."""
        shares = contiguous_shares(len(prompts), self.world_size)
        results = self._all(lambda actor, rank: actor.generate.remote(
            [prompts[i] for i in shares[rank]] or prompts[:1], max_new_tokens=max_new_tokens, pad_id=pad_id,
            stop_ids=stop_ids), "generating for eval")
        return [completion for share, result in zip(shares, results, strict=True) if share for completion in result]

    def export_weight_buckets(self, bucket_bytes: int) -> ExportedWeights:
        """Object refs of the full weights in numpy buckets (put by rank 0), with their checksums."""
        return self._rank0(lambda actor, rank: actor.export_weight_buckets.remote(bucket_bytes),
                           "exporting weights for a push")


class CriticGroup(_TrainerGroup[Critic]):
    """PPO's value model ranks."""

    role = Critic

    def values(self, batch: TokenBatch, *, micro_batch_size: int) -> torch.Tensor:
        """(B, T-1) values of each prefix, aligned like log-probs; each rank computes its shard of the rows."""
        shards = RowShards.split(batch, self.world_size, micro_batch_size)
        return shards.stitch(self._all(lambda actor, rank: actor.values.remote(shards.micro_batches(rank)),
                                       "computing values"))

    def start_value_step(self, batches: list[list[ValueBatch]], *, global_num_tokens: int) -> PendingStep:
        """One optimizer step of the clipped value loss, started on every rank (``batches[rank]``)."""
        return self._pending(lambda actor, rank: actor.train_value_step.remote(
            batches[rank], global_num_tokens=global_num_tokens), "a value step")


class RewardTrainerGroup(_TrainerGroup[RewardModelTrainer]):
    """The reward model's ranks (the rm stage)."""

    role = RewardModelTrainer

    def train_reward_step(self, batches: list[list[PreferenceBatch]], global_num_pairs: int,
                          center_coef: float) -> dict[str, float]:
        return combine_rank_metrics(self._all(lambda actor, rank: actor.train_reward_step.remote(
            batches[rank], global_num_pairs=global_num_pairs, center_coef=center_coef), "a reward-model step"))

    def eval_pairs(self, batches: list[PreferenceBatch], center_coef: float) -> dict[str, float]:
        return self._rank0(lambda actor, rank: actor.eval_pairs.remote(batches, center_coef), "evaluating pairs")
