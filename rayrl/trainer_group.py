"""A group of PolicyTrainer actors forming one DeepSpeed data-parallel job, placed by Ray."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rayrl.actors.policy_trainer import PolicyTrainer, TrainerSpec
from rayrl.data.batch import TokenBatch


class TrainerGroup:
    """N ranks of PolicyTrainer, one Ray actor each, packed into one placement group.

    Every method calls all ranks (DeepSpeed collectives need them all) and returns rank 0's answer.
    """

    def __init__(self, spec: TrainerSpec, *, num_cpus: float, num_gpus: float):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.spec = spec
        bundle = {key: value for key, value in (("CPU", num_cpus), ("GPU", num_gpus)) if value > 0}
        self.placement_group = None
        options: list[dict[str, Any]] = [{} for _ in range(spec.world_size)]
        if bundle:
            self.placement_group = placement_group([bundle] * spec.world_size, strategy="PACK")
            ray.get(self.placement_group.ready(), timeout=300)
            options = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=i)} for i in range(spec.world_size)]
        remote_cls = ray.remote(PolicyTrainer)
        self.actors = [
            remote_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, **options[rank]).remote(spec, rank)
            for rank in range(spec.world_size)
        ]
        master_addr, master_port = ray.get(self.actors[0].address.remote())
        ips = ray.get([actor.node_ip.remote() for actor in self.actors])
        per_node = Counter(ips)
        seen: Counter[str] = Counter()
        local_ranks = []
        for ip in ips:
            local_ranks.append(seen[ip])
            seen[ip] += 1
        self.setup_info = ray.get([
            actor.setup.remote(master_addr, master_port, local_ranks[rank], per_node[ips[rank]])
            for rank, actor in enumerate(self.actors)
        ])

    def _all(self, method: str, *per_rank_args: list, **shared: Any) -> list:
        import ray

        calls = []
        for rank, actor in enumerate(self.actors):
            args = [arg[rank] for arg in per_rank_args]
            calls.append(getattr(actor, method).remote(*args, **shared))
        return ray.get(calls)

    def train_step(self, batches: list[list[TokenBatch]], global_num_tokens: int) -> dict[str, float]:
        """``batches[rank]`` are that rank's micro-batches. Returns the global-batch loss and stats."""
        results = self._all("train_step", batches, global_num_tokens=global_num_tokens)
        return {
            "loss": sum(r["loss_share"] for r in results),
            "grad_norm": results[0]["grad_norm"],
            "lr": results[0]["lr"],
            "memory/trainer_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        }

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
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            self._all("shutdown")
        finally:
            for actor in self.actors:
                ray.kill(actor)
            if self.placement_group is not None:
                remove_placement_group(self.placement_group)
