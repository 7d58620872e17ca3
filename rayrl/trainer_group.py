"""A group of PolicyTrainer actors forming one DeepSpeed data-parallel job, placed by Ray."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rayrl.actors.engine import TrainerSpec
from rayrl.actors.policy_trainer import PolicyTrainer
from rayrl.data.batch import TokenBatch


class TrainerGroup:
    """N ranks of a trainer role (PolicyTrainer by default), one Ray actor each, in one placement group.

    Every method calls all ranks (DeepSpeed collectives need them all) and returns rank 0's answer.
    """

    def __init__(self, spec: TrainerSpec, *, num_cpus: float, num_gpus: float, role: type = PolicyTrainer,
                 separate_reference: bool = False, role_kwargs: dict[str, Any] | None = None,
                 shared_bundle: dict[str, float] | None = None, resources: dict[str, float] | None = None):
        """``shared_bundle``: extra resources added to every rank's bundle, for actors the caller
        co-locates with the ranks (``bundle_strategy``), e.g. rollout workers sharing a GPU.
        ``resources``: custom Ray resources each rank asks for (pins ranks to node groups)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.spec = spec
        extra = shared_bundle or {}
        resources = dict(resources or {})
        bundle = {key: value for key, value in (("CPU", num_cpus + extra.get("CPU", 0.0)),
                                                ("GPU", num_gpus + extra.get("GPU", 0.0))) if value > 0}
        for key, value in [*resources.items(), *extra.items()]:
            if key not in ("CPU", "GPU"):
                bundle[key] = bundle.get(key, 0.0) + value
        self.placement_group = None
        self.actors = []
        try:
            options: list[dict[str, Any]] = [{} for _ in range(spec.world_size)]
            if bundle:
                self.placement_group = placement_group([bundle] * spec.world_size, strategy="PACK")
                ray.get(self.placement_group.ready(), timeout=300)
                options = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i)} for i in range(spec.world_size)]
            remote_cls = ray.remote(role)
            self.actors = [
                remote_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, **options[rank]).remote(
                    spec, rank, **(role_kwargs or {}))
                for rank in range(spec.world_size)
            ]
            self._setup(separate_reference)
        except BaseException:
            self._release()  # a rank that failed to start (or a bundle never placed) leaks nothing
            raise

    def _setup(self, separate_reference: bool) -> None:
        import ray

        master_addr, master_port = ray.get(self.actors[0].address.remote())
        ips = ray.get([actor.node_ip.remote() for actor in self.actors])
        per_node = Counter(ips)
        seen: Counter[str] = Counter()
        local_ranks = []
        for ip in ips:
            local_ranks.append(seen[ip])
            seen[ip] += 1
        self.setup_info = ray.get([
            actor.setup.remote(master_addr, master_port, local_ranks[rank], per_node[ips[rank]],
                               separate_reference=separate_reference)
            for rank, actor in enumerate(self.actors)
        ])

    def bundle_strategy(self, rank: int):
        """A scheduling strategy that places an actor in rank ``rank``'s bundle (co-location)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.placement_group is None:
            return None
        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)

    def export_weight_buckets(self, bucket_bytes: int) -> list:
        """Object refs of the full weights in numpy buckets (put by rank 0)."""
        return self._all("export_weight_buckets", [bucket_bytes] * len(self.actors))[0]

    def _all(self, method: str, *per_rank_args: list, **shared: Any) -> list:
        import ray

        return ray.get(self.start(method, *per_rank_args, **shared))

    def start(self, method: str, *per_rank_args: list, **shared: Any) -> list:
        """Call ``method`` on every rank (``per_rank_args[i][rank]``, plus ``shared`` keywords) without
        waiting: the refs, for :meth:`finish`. Lets two groups (policy and critic) work at once."""
        return [getattr(actor, method).remote(*[arg[rank] for arg in per_rank_args], **shared)
                for rank, actor in enumerate(self.actors)]

    def finish(self, refs: list) -> dict[str, float]:
        """Wait for a :meth:`start`-ed training step; the ranks' metrics combined."""
        import ray

        return self._combine(ray.get(refs))

    @staticmethod
    def _combine(results: list[dict]) -> dict[str, float]:
        """Loss and stats are per-rank shares of global means: sum them. Norm and LR agree on all ranks."""
        combined = {key: sum(r[key] for r in results) for key in results[0]
                    if key not in ("grad_norm", "lr", "peak_rss_mb") and not key.startswith("time/")}
        combined.update({key: max(r[key] for r in results) for key in results[0] if key.startswith("time/")})
        combined.update(grad_norm=results[0]["grad_norm"], lr=results[0]["lr"])
        combined["memory/trainer_peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
        return combined

    def train_sft_step(self, batches: list[list[TokenBatch]], global_num_tokens: int) -> dict[str, float]:
        """``batches[rank]`` are that rank's micro-batches. Returns the global-batch loss and stats."""
        return self._combine(self._all("train_sft_step", batches, global_num_tokens=global_num_tokens))

    def train_preference_step(self, batches: list[list], global_num_examples: int, objective) -> dict[str, float]:
        return self._combine(self._all("train_preference_step", batches,
                                       global_num_examples=global_num_examples, objective=objective))

    def train_reward_step(self, batches: list[list], global_num_pairs: int, center_coef: float) -> dict[str, float]:
        return self._combine(self._all("train_reward_step", batches, global_num_pairs=global_num_pairs,
                                       center_coef=center_coef))

    def rank0(self, method: str, *args, **kwargs):
        """Call a method on every rank with the same arguments; return rank 0's result."""
        return self._all(method, *[[a] * len(self.actors) for a in args], **kwargs)[0]

    def eval_loss(self, batches: list[TokenBatch]) -> float:
        """Token-mean NLL; every rank evaluates the same batches (equal forward counts for ZeRO-3)."""
        total, count = self._all("eval_loss", [batches] * len(self.actors))[0]
        return total / max(count, 1)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                 stop_ids: list[int]) -> list[list[int]]:
        return self._all("generate", [prompts] * len(self.actors), max_new_tokens=max_new_tokens,
                         pad_id=pad_id, stop_ids=stop_ids)[0]

    def save_checkpoint(self, directory: str) -> None:
        self._all("save_checkpoint", [directory] * len(self.actors))

    def load_checkpoint(self, directory: str) -> None:
        self._all("load_checkpoint", [directory] * len(self.actors))

    def export_hf(self, directory: str) -> None:
        self._all("export_hf", [directory] * len(self.actors))

    def shutdown(self) -> None:
        try:
            self._all("shutdown")
        finally:
            self._release()

    def _release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
