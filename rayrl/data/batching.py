"""Deterministic step batching shared by every single-actor stage."""

from __future__ import annotations

import random
from typing import Any, Callable, Generic, TypeVar

from rayrl.data.loading import DataError

Item = TypeVar("Item")


def steps_for_epochs(num_rows: int, epochs: float, global_batch_size: int) -> int:
    return max(1, int(epochs * num_rows) // global_batch_size)


class StepBatcher(Generic[Item]):
    """Step s always gets the same rows, so a resumed run replays exactly.

    The stream is the concatenation of per-epoch permutations of ``items`` (seeded by seed + epoch),
    turned into rows by ``make_rows`` (e.g. packing; identity by default); step s takes rows
    [s*G, (s+1)*G). Rank r gets the r-th contiguous slice of G/W rows, cut into micro-batches and
    collated by ``collate``.
    """

    def __init__(self, items: list[Item], *, global_batch_size: int, micro_batch_size: int, world_size: int,
                 seed: int, shuffle: bool, collate: Callable[[list[Any]], Any],
                 make_rows: Callable[[list[Item]], list[Any]] = list, unit: str = "rows"):
        self.items = items
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.collate = collate
        self.make_rows = make_rows
        self._epochs: dict[int, list[Any]] = {}
        self.rows_per_epoch = len(self._epoch_rows(0))
        if self.rows_per_epoch < global_batch_size:
            raise DataError(f"the training set has {self.rows_per_epoch} {unit}, fewer than "
                            f"train.global_batch_size ({global_batch_size})")

    def _epoch_rows(self, epoch: int) -> list[Any]:
        if epoch not in self._epochs:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._epochs = {epoch: self.make_rows([self.items[i] for i in order])}  # keep one epoch
        return self._epochs[epoch]

    def steps_for_epochs(self, epochs: float) -> int:
        return steps_for_epochs(self.rows_per_epoch, epochs, self.global_batch_size)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.rows_per_epoch

    def step_rows(self, step: int) -> list[Any]:
        start = step * self.global_batch_size
        rows = []
        for index in range(start, start + self.global_batch_size):
            epoch, offset = divmod(index, self.rows_per_epoch)
            rows.append(self._epoch_rows(epoch)[offset])
        return rows

    def step_batches(self, step: int) -> list[list[Any]]:
        """[rank][micro_batch] collated batches for optimizer step ``step``."""
        rows = self.step_rows(step)
        per_rank = self.global_batch_size // self.world_size
        return [[self.collate(rows[rank * per_rank + i: rank * per_rank + i + self.micro_batch_size])
                 for i in range(0, per_rank, self.micro_batch_size)]
                for rank in range(self.world_size)]
