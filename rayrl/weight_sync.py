"""Trainer side of the weight sync: bucket a state dict into numpy arrays and push it through Ray.

Transport (measured, see /work/shared/VLLM_WEIGHT_SYNC.md): ``ray.put`` of a dict of *numpy* arrays is
serialized with pickle-5 out-of-band buffers straight into the object store, and ``ray.get`` in the
rollout actor returns read-only numpy views of that shared memory (zero-copy); ``torch.from_numpy``
then wraps them without another copy. Putting torch tensors instead was 2-6x slower.

Buckets: parameters are grouped into dicts of about ``bucket_bytes`` so that a push is a handful of
object-store entries and engine calls (never one per parameter) while no single object has to hold
the whole model. A tensor larger than ``bucket_bytes`` gets a bucket of its own (it is never split).
Order is preserved (``named_parameters`` order keeps each decoder layer's tensors together, which lets
vLLM's layerwise reload process a layer as soon as it is complete).

bf16: numpy has no bfloat16. Widening to float32 would double the bytes and is lossless but pointless;
instead a bf16 tensor travels as its raw 2-byte words in an array whose dtype is the structured dtype
:data:`BF16` (one ``int16`` field named ``"bfloat16"``). The tag lives in the array's own dtype, so a
bucket stays a flat ``{name: array}`` dict, and :func:`numpy_to_tensor` turns it back into a bf16 tensor
without copying. Any other dtype numpy knows (float32, float16, ...) travels as itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


def push_to_workers(workers: Sequence[Any], version: int, buckets: Sequence[Mapping[str, np.ndarray]]) -> PushStats:
    """``ray.put`` each bucket once and have every rollout worker load them as policy ``version``.

    The refs travel *inside a list*, so Ray hands them to the actor unresolved and each worker does
    its own (zero-copy) ``ray.get``: the bytes are serialized once however many workers there are.
    Blocks until all workers have loaded the weights; a worker's failure is raised here.
    """
    import ray

    start = time.perf_counter()
    refs = [ray.put(dict(bucket)) for bucket in buckets]
    put_done = time.perf_counter()
    worker_stats = ray.get([w.update_weights.remote(version, refs) for w in workers])
    end = time.perf_counter()
    return PushStats(version=version, seconds=end - start, put_seconds=put_done - start,
                     bytes=bucket_nbytes(buckets), num_buckets=len(buckets), worker_stats=list(worker_stats))
