"""Trainer side of the weight sync: bucket a state dict into numpy arrays and push it through Ray.

Transport (measured on vLLM-CPU): ``ray.put`` of a dict of *numpy* arrays is
serialized with pickle-5 out-of-band buffers straight into the object store, and ``ray.get`` in the
rollout actor returns read-only numpy views of that shared memory (zero-copy); ``torch.from_numpy``
then wraps them without another copy. Putting torch tensors instead was 2-6x slower.

Buckets: parameters are grouped into dicts of about ``bucket_bytes`` so that a push is a handful of
object-store entries and engine calls (never one per parameter) while no single object has to hold
the whole model. A tensor larger than ``bucket_bytes`` gets a bucket of its own (it is never split).
Order is preserved (``named_parameters`` order keeps each decoder layer's tensors together, which lets
vLLM's layerwise reload process a layer as soon as it is complete).

Checksums: the trainer takes a CRC-32 of every tensor's bytes before ``ray.put`` (about 4 GB/s); the
worker checks them after its fetch, before the engine is touched, so a bucket damaged in transit is
named (tensor, bucket, version) instead of silently loaded.

bf16: numpy has no bfloat16. Widening to float32 would double the bytes and is lossless but pointless;
instead a bf16 tensor travels as its raw 2-byte words in an array whose dtype is the structured dtype
:data:`BF16` (one ``int16`` field named ``"bfloat16"``). The tag lives in the array's own dtype, so a
bucket stays a flat ``{name: array}`` dict, and :func:`numpy_to_tensor` turns it back into a bf16 tensor
without copying. Any other dtype numpy knows (float32, float16, ...) travels as itself.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayrl.cuda_transfer import merge_handles
from rayrl.remote import ActorIdentity, RoleFailed, first_line, gather

_log = logging.getLogger(__name__)

WEIGHT_LOAD_GROUP = "weight_loads"
"""The rollout worker's concurrency group for pushes when it loads them under a generate in flight
(``rollout.partial_rollouts``)."""

BF16 = np.dtype([("bfloat16", "<i2")])
"""numpy dtype tag for bfloat16 payloads (raw bits, 2 bytes per element)."""


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU numpy array with ``tensor``'s values (bf16 as :data:`BF16`-tagged bits).

    CPU tensors that are already contiguous are *shared*, not copied: ``ray.put`` (in
    :func:`push_to_workers`) takes the snapshot, so put a bucket before the next optimizer step.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`tensor_to_numpy`, zero-copy (the tensor shares the array's memory)."""
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def bucket_state_dict(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 64 << 20
) -> list[dict[str, np.ndarray]]:
    """Group ``(hf_name, tensor)`` pairs into ``{hf_name: numpy}`` buckets of about ``bucket_bytes``.

    Tensors that are views of the same storage (tied weights listed by ``state_dict()`` under two
    names) are sent once, under the first name: vLLM's loaders skip the tied alias anyway.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = 0
    seen: set[tuple] = set()
    for name, tensor in named_tensors:
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and key in seen:
            continue
        seen.add(key)
        array = tensor_to_numpy(tensor)
        if current and size + array.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    if current:
        buckets.append(current)
    return buckets


def tensor_checksums(bucket: Mapping[str, np.ndarray]) -> dict[str, int]:
    """CRC-32 of each array's bytes (any dtype, bf16's tagged words included)."""
    return {name: zlib.crc32(np.ascontiguousarray(array).view(np.uint8)) for name, array in bucket.items()}


class WeightChecksumError(RuntimeError):
    """A pushed tensor's bytes differ from the ones the trainer sent."""


class WeightSyncError(RuntimeError):
    """A push that could not be delivered intact, or an engine whose log-probs disagree with the
    trainer's after a push, even after one re-push: the run stops (the message names the worker)."""


def check_checksums(buckets: Sequence[Mapping[str, np.ndarray]], checksums: Sequence[Mapping[str, int]],
                    version: int) -> None:
    """Raise :class:`WeightChecksumError` naming the first tensor whose bytes do not match."""
    if len(checksums) != len(buckets):
        raise WeightChecksumError(f"push of version {version}: {len(buckets)} buckets arrived, {len(checksums)} sent")
    for index, (bucket, sent) in enumerate(zip(buckets, checksums)):
        if set(bucket) != set(sent):
            raise WeightChecksumError(f"push of version {version}: bucket {index} holds {sorted(bucket)}, "
                                      f"the trainer sent {sorted(sent)}")
        for name, got in tensor_checksums(bucket).items():
            if got != sent[name]:
                raise WeightChecksumError(f"push of version {version}: tensor {name!r} (bucket {index}) arrived "
                                          f"corrupted (crc32 {got:#010x}, sent {sent[name]:#010x})")


@dataclass(frozen=True)
class ExportedWeights:
    """A trainer's weights in the object store: refs of ``{hf_name: numpy}`` buckets and, per bucket,
    the CRC-32 of each tensor taken before the put (empty on ranks other than 0). An adapter push
    (``rollout.lora_sync: adapter``) holds the LoRA adapter's tensors under PEFT's file names and its
    ``adapter_config.json`` as a dict."""

    refs: list
    checksums: list[dict[str, int]]
    adapter_config: dict | None = None

    @classmethod
    def put(cls, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
            adapter_config: dict | None = None) -> ExportedWeights:
        """``named_tensors`` in numpy buckets, each checksummed (before the put: what was sent) and put
        into the object store once."""
        import ray  # slow: ray

        refs, checksums = [], []
        for bucket in bucket_state_dict(named_tensors, bucket_bytes=bucket_bytes):
            checksums.append(tensor_checksums(bucket))
            refs.append(ray.put(bucket))
        return cls(refs, checksums, adapter_config)


def bucket_nbytes(buckets: Sequence[Mapping[str, np.ndarray]]) -> int:
    return sum(int(a.nbytes) for b in buckets for a in b.values())


@dataclass(frozen=True)
class PushStats:
    """One push to all workers. ``worker_stats`` are the workers' ``SyncStats`` in ``workers`` order."""

    version: int
    seconds: float  # wall time of the whole push: put + every worker's fetch/load, workers in parallel
    put_seconds: float  # serializing the buckets into the object store (once, shared by all workers)
    bytes: int
    num_buckets: int
    worker_stats: list[Any]

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def push_to_workers(workers: Sequence[Any], version: int, buckets: Sequence[Mapping[str, np.ndarray]], *,
                    deadline_s: float = 900.0) -> PushStats:
    """``ray.put`` each bucket once and have every rollout worker load them as policy ``version``.

    The refs travel *inside a list*, so Ray hands them to the actor unresolved and each worker does
    its own (zero-copy) ``ray.get``: the bytes are serialized once however many workers there are.
    Waits (at most ``deadline_s``) until all workers have loaded the weights; a worker's failure is
    raised here.
    """
    import ray  # slow: ray

    start = time.perf_counter()
    refs = [ray.put(dict(bucket)) for bucket in buckets]
    put_done = time.perf_counter()
    worker_stats = gather([w.update_weights.remote(version, refs) for w in workers],
                          who=[ActorIdentity("rollout", i) for i in range(len(workers))],
                          doing=f"loading pushed weights (version {version})", deadline_s=deadline_s,
                          setting="fault.timeouts.sync_s")
    end = time.perf_counter()
    return PushStats(version=version, seconds=end - start, put_seconds=put_done - start,
                     bytes=bucket_nbytes(buckets), num_buckets=len(buckets), worker_stats=list(worker_stats))


@dataclass
class PendingPush:
    """A push whose loads are started and not yet waited for (``WeightPusher.start``): each worker
    loads before any call submitted to it later, so work sent after ``start`` sees ``version``."""

    version: int
    seconds: float  # spent starting it (the export; the whole push for the other transports)
    exported: ExportedWeights | None  # object_store: what the workers load (None: already loaded)
    targets: list[tuple[int, Any]]  # (worker index, the worker's handle then)
    loads: list  # one update_weights ref per target
    nbytes: int = 0  # per worker, once known


class WeightPusher:
    """Pushes the trainer group's weights to the rollout workers as one policy version, over the
    configured transport (see :mod:`rayrl.cuda_transfer` for the GPU ones):

    - ``object_store``: rank 0 ``ray.put``s numpy buckets once; every worker fetches them.
    - ``ipc``: every trainer rank packs CUDA buffers on its GPU and shares IPC handles; each worker
      opens the one on its own GPU; the trainers free the buffers once all workers have loaded.
    - ``nccl``: trainer rank 0 broadcasts packed buckets to every worker (a group formed in
      :meth:`connect`); the other trainer ranks only join the ZeRO-3 gather.

    ``push`` returns ``(seconds, bytes per worker)``.
    """

    def __init__(self, transport: str, trainer_actors: Sequence[Any], workers: Sequence[Any], *,
                 bucket_bytes: int, wire_dtype: str | None = None, deadline_s: float = 900.0,
                 trainer_who: Sequence[ActorIdentity] | None = None,
                 worker_who: Sequence[ActorIdentity] | None = None, concurrent_loads: bool = False,
                 adapter_only: bool = False) -> None:
        """``deadline_s`` bounds each step of a push (``fault.timeouts.sync_s``); ``trainer_who`` /
        ``worker_who`` name the actors in its errors. ``concurrent_loads`` (partial rollouts): loads go
        to the workers' ``WEIGHT_LOAD_GROUP``, beside a generate in flight, instead of behind it.
        ``adapter_only`` (``rollout.lora_sync: adapter``, object_store): push the LoRA adapter alone."""
        if transport not in ("object_store", "ipc", "nccl"):
            raise ValueError(f"unknown weight transport {transport!r}")
        if adapter_only and transport != "object_store":
            raise ValueError(f"adapter-only pushes go over the object store, not {transport!r}")
        self.adapter_only = adapter_only
        self.transport = transport
        self.trainers = list(trainer_actors)
        # Not copied: a rollout pool replaces a failed worker in these lists (``rayrl.recovery``).
        self.workers = workers if isinstance(workers, list) else list(workers)
        self.deadline_s = deadline_s
        self.trainer_who = list(trainer_who or [ActorIdentity("PolicyTrainer", i) for i in range(len(self.trainers))])
        self.worker_who = (worker_who if isinstance(worker_who, list)
                           else list(worker_who or [ActorIdentity("rollout", i) for i in range(len(self.workers))]))
        self.version: int | None = None  # the last version pushed (None: the engines serve the initial weights)
        self.bucket_bytes = bucket_bytes
        self.wire_dtype = wire_dtype
        self.concurrent_loads = concurrent_loads
        self._connected = transport != "nccl"
        self._last_export: ExportedWeights | None = None  # object_store: the last pushed version's buckets
        # catch_up may run on the async rollout scheduler's thread while the loop pushes.
        self._lock = threading.RLock()

    def _gather(self, refs: list, who: Sequence[ActorIdentity], doing: str) -> list:
        return gather(refs, who=who, doing=doing, deadline_s=self.deadline_s, setting="fault.timeouts.sync_s")

    def connect(self) -> None:
        """Form the NCCL group (trainer rank 0 = rank 0, worker i = rank 1 + i); the first push does
        it if the caller has not. No-op for the other transports."""
        if self._connected:
            return
        host, port = self._gather([self.trainers[0].weight_broadcast_address.remote()], self.trainer_who[:1],
                                  "opening the weight broadcast")[0]
        world = 1 + len(self.workers)
        self._gather([self.trainers[0].init_weight_broadcast.remote(host, port, world)]
                     + [w.init_weight_broadcast.remote(host, port, 1 + i, world) for i, w in enumerate(self.workers)],
                     self.trainer_who[:1] + self.worker_who, "joining the weight broadcast")
        self._connected = True

    def push(self, version: int, only: Sequence[int] | None = None) -> tuple[float, int]:
        """The trainers' current weights into every worker (or the workers ``only``) as ``version``."""
        with self._lock:
            return self._push(version, only)

    def start(self, version: int) -> PendingPush:
        """Export the trainers' weights and start every worker's load of ``version`` without waiting for
        it (object_store; the other transports push at once). ``finish`` waits."""
        with self._lock:
            if self.transport != "object_store":
                seconds, nbytes = self._push(version, None)
                return PendingPush(version, seconds, None, [], [], nbytes)
            start = time.perf_counter()
            self.version = version
            exported = self._last_export = self._export()
            targets = list(enumerate(self.workers))
            loads = [self._in_load_group(w.update_weights).remote(version, exported.refs, exported.checksums,
                                                                  exported.adapter_config)
                     for _, w in targets]
            return PendingPush(version, time.perf_counter() - start, exported, targets, loads)

    def finish(self, pending: PendingPush, behind_s: float = 0.0) -> tuple[float, int]:
        """Wait for the loads ``start`` began: ``(seconds spent in start and here, bytes per worker)``. A worker
        replaced meanwhile is skipped (its replacement caught up on the last export); a damaged load is
        loaded again once from the same export, then raises ``WeightSyncError``. ``behind_s``: how long a
        load may wait behind the work a worker had when it was started, on top of the sync deadline."""
        start = time.perf_counter()
        if pending.exported is not None:
            live = [(i, ref) for (i, handle), ref in zip(pending.targets, pending.loads)
                    if i < len(self.workers) and self.workers[i] is handle]
            try:
                stats = gather([ref for _, ref in live], who=[self.worker_who[i] for i, _ in live],
                               doing=f"loading pushed weights (version {pending.version})",
                               deadline_s=self.deadline_s + behind_s, setting="fault.timeouts.sync_s")
            except WeightChecksumError as damaged:
                _log.warning("a weight push arrived damaged, loading it again: %s", first_line(damaged))
                stats = self._reload(pending.version, pending.exported, [i for i, _ in live])
            pending.exported = None
            pending.nbytes = stats[0].bytes if stats else 0
        pending.seconds += time.perf_counter() - start
        return pending.seconds, pending.nbytes

    def load_again(self, version: int) -> None:
        """Every worker loads the last push (``version``) again, from the same export when there is one."""
        with self._lock:
            self._push(version, None, reuse_export=self.version == version)

    def _reload(self, version: int, exported: ExportedWeights, indices: Sequence[int]) -> list:
        stats = []
        for i in indices:
            try:
                stats += self._load(version, exported, [self.workers[i]], [self.worker_who[i]])
            except WeightChecksumError as again:
                raise WeightSyncError(f"{self.worker_who[i].describe()}: {first_line(again)}; the weights were "
                                      "pushed twice and arrived damaged both times") from again
        return stats

    def _push(self, version: int, only: Sequence[int] | None, reuse_export: bool = False) -> tuple[float, int]:
        start = time.perf_counter()
        self.version = version
        indices = range(len(self.workers)) if only is None else list(only)
        workers = [self.workers[i] for i in indices]
        worker_who = [self.worker_who[i] for i in indices]
        if only is not None and self.transport == "nccl":
            raise RoleFailed(f"{', '.join(w.describe() for w in worker_who)} restarted, but the nccl weight "
                             "transport cannot add a worker to its broadcast group yet; use rollout.weight_transport: "
                             "object_store, or fault.max_restarts: 0")
        self.connect()
        if self.transport == "object_store":
            try:
                exported = self._last_export if reuse_export and self._last_export is not None else self._export()
                self._last_export = exported
                stats = self._load(version, exported, workers, worker_who)
            except WeightChecksumError as damaged:  # once more; a second failure stops the run
                _log.warning("a weight push arrived damaged, pushing again: %s", first_line(damaged))
                stats = self._reload(version, exported, list(indices))
            nbytes = stats[0].bytes
        elif self.transport == "ipc":
            per_rank = self._gather([t.share_weights_ipc.remote(self.bucket_bytes, self.wire_dtype)
                                     for t in self.trainers], self.trainer_who, "sharing weights over CUDA IPC")
            handles = merge_handles([[b["handles"] for b in rank] for rank in per_rank])
            shared = [{"handles": h, "layout": b["layout"]} for h, b in zip(handles, per_rank[0])]
            loads = [self._in_load_group(w.update_weights_ipc).remote(version, shared) for w in workers]
            try:
                self._gather(loads, worker_who, f"loading pushed weights over CUDA IPC (version {version})")
            finally:
                import ray  # slow: ray

                # gather raises at the first failure: the other workers may still read the buffers
                ray.wait(loads, num_returns=len(loads), timeout=self.deadline_s)
                self._gather([t.release_shared_weights.remote() for t in self.trainers], self.trainer_who,
                             "releasing the shared weight buffers")
            nbytes = sum(b["layout"].nbytes for b in shared)
        else:
            sent = self._gather([t.broadcast_weights.remote(self.bucket_bytes, self.wire_dtype) for t in self.trainers]
                                + [w.update_weights_nccl.remote(version) for w in self.workers],
                                self.trainer_who + self.worker_who, f"broadcasting weights over NCCL (version {version})")
            nbytes = sent[0]
        return time.perf_counter() - start, nbytes

    def _export(self) -> ExportedWeights:
        if self.adapter_only:
            return self._gather([t.export_adapter_buckets.remote(self.bucket_bytes) for t in self.trainers],
                                self.trainer_who, "exporting the LoRA adapter for a push")[0]
        return self._gather([t.export_weight_buckets.remote(self.bucket_bytes) for t in self.trainers],
                            self.trainer_who, "exporting weights for a push")[0]

    def _load(self, version: int, exported: ExportedWeights, workers: Sequence[Any],
              worker_who: Sequence[ActorIdentity]) -> list:
        return self._gather([self._in_load_group(w.update_weights).remote(version, exported.refs, exported.checksums,
                                                                          exported.adapter_config)
                             for w in workers], worker_who, f"loading pushed weights (version {version})")

    def _in_load_group(self, method: Any) -> Any:
        """``method`` (a worker's load) in the concurrency group that runs beside a generate, if used."""
        return method.options(concurrency_group=WEIGHT_LOAD_GROUP) if self.concurrent_loads else method

    def rewind(self, version: int) -> None:
        """The run went back to its checkpoint of ``version``: the workers accept that version next
        (``push`` after the trainers loaded it)."""
        with self._lock:
            self._gather([w.rewind_version.remote(version) for w in self.workers], self.worker_who,
                         f"going back to policy version {version}")
            self.version = version
            self._last_export = None

    def use_trainers(self, trainer_actors: Sequence[Any], trainer_who: Sequence[ActorIdentity]) -> None:
        """Push from a rebuilt trainer group from now on."""
        self.trainers, self.trainer_who = list(trainer_actors), list(trainer_who)

    def catch_up(self, index: int) -> None:
        """Give a restarted worker ``index`` the last pushed version (before the first push it has the
        initial weights already: it loaded them from the model directory). Over the object store the
        last push's buckets are loaded again: the trainers may have moved on since (async RL)."""
        with self._lock:
            if self.version is not None:
                self._push(self.version, only=[index], reuse_export=True)
