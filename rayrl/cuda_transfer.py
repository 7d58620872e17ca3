"""GPU weight transports for the trainer -> rollout sync: CUDA IPC (colocated) and NCCL (split).

On CPU the sync goes through Ray's object store (:mod:`rayrl.weight_sync`). On GPUs that would copy
every weight device -> host -> device; instead the trainer packs its weights into a few flat GPU
buffers ("buckets") and the rollout engine reads them straight from GPU memory:

- ``ipc`` (``placement: colocated``, trainer and engine on the same GPU): the trainer exports a CUDA
  IPC handle of each packed buffer (``torch.multiprocessing.reductions.reduce_tensor``), keyed by the
  physical GPU's UUID; the engine opens the handle for *its* GPU and loads views of the buffer. No
  bytes are copied between processes. Every trainer rank packs (the weights are replicated, or
  gathered under ZeRO-3), so each engine finds a buffer on its own GPU.
- ``nccl`` (``placement: split``): trainer rank 0 and every rollout engine form one NCCL group through
  vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator`` (independent of the trainers' own
  process group); rank 0 broadcasts each packed buffer, the engines receive into a buffer of their own.

Packing: tensors are laid out back to back in a ``uint8`` buffer at 256-byte aligned offsets, so each
one is a zero-copy typed view on the receiving side; a :class:`BucketLayout` (names, dtypes, shapes,
offsets) travels with the buffer. The receiver then loads ``(hf_name, view)`` pairs through the same
layerwise reload as the CPU path (:class:`rayrl.vllm_ext.WeightSyncExtension`), so the loading half of
every transport is the one the CPU tests run against the real vLLM engine. ``wire_dtype`` casts
floating tensors while packing (an fp32 trainer feeding a bf16 engine sends half the bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

ALIGN_BYTES = 256


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor lives in a packed ``uint8`` buffer of ``nbytes`` bytes."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]  # torch dtype names, e.g. "bfloat16"
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a bucket layout")
    return dtype


def _aligned(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 wire_dtype: torch.dtype | None = None) -> list[BucketLayout]:
    """Group ``(hf_name, tensor)`` pairs into layouts of about ``bucket_bytes`` (in order; a tensor
    larger than that gets a bucket of its own). Tied weights (views of one storage) are sent once,
    under the first name, as in :func:`rayrl.weight_sync.bucket_state_dict`."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    layouts: list[BucketLayout] = []
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    size = 0
    seen: set[tuple] = set()

    def close() -> None:
        nonlocal entries, size
        if entries:
            names, dtypes, shapes, offsets = (tuple(x) for x in zip(*entries))
            layouts.append(BucketLayout(names, dtypes, shapes, offsets, size))
        entries, size = [], 0

    for name, tensor in named_tensors:
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and key in seen:
            continue
        seen.add(key)
        dtype = wire_dtype if wire_dtype is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = _aligned(tensor.numel() * dtype.itemsize)
        if entries and size + nbytes > bucket_bytes:
            close()
        entries.append((name, str(dtype).removeprefix("torch."), tuple(tensor.shape), size))
        size += nbytes
    close()
    return layouts


def _view(flat: torch.Tensor, layout: BucketLayout, i: int) -> torch.Tensor:
    dtype = _dtype(layout.dtypes[i])
    shape = layout.shapes[i]
    count = 1
    for dim in shape:
        count *= dim
    start = layout.offsets[i]
    return flat[start:start + count * dtype.itemsize].view(dtype).view(shape)


def pack_bucket(tensors: Mapping[str, torch.Tensor], layout: BucketLayout, *,
                out: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Copy (and cast) the layout's tensors into one flat ``uint8`` buffer (``out`` or a new one)."""
    if out is None:
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    elif out.dtype != torch.uint8 or out.numel() < layout.nbytes:
        raise ValueError(f"pack_bucket: out must be a uint8 buffer of at least {layout.nbytes} bytes")
    for i, name in enumerate(layout.names):
        if name not in tensors:
            raise KeyError(f"pack_bucket: the layout names {name!r}, which the model does not have")
        tensor = tensors[name]
        if tuple(tensor.shape) != layout.shapes[i]:
            raise ValueError(f"pack_bucket: {name!r} has shape {tuple(tensor.shape)}, the layout says {layout.shapes[i]}")
        _view(out, layout, i).copy_(tensor)
    return out


def unpack_bucket(flat: torch.Tensor, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """``(hf_name, view)`` pairs over a packed buffer (no copy)."""
    if flat.dtype != torch.uint8 or flat.numel() < layout.nbytes:
        raise ValueError(f"unpack_bucket: expected a uint8 buffer of at least {layout.nbytes} bytes, "
                         f"got {flat.dtype} x {flat.numel()}")
    return [(name, _view(flat, layout, i)) for i, name in enumerate(layout.names)]


# ------------------------------------------------------------------------------ CUDA IPC


def gpu_uuid(device_index: int | None = None) -> str:
    index = torch.cuda.current_device() if device_index is None else device_index
    return str(torch.cuda.get_device_properties(index).uuid)


def share_ipc(flat: torch.Tensor) -> dict[str, tuple]:
    """``{physical GPU UUID: rebuild args}`` for a CUDA buffer. The caller keeps ``flat`` alive (and
    unmodified) until every receiver has loaded it; pending copies into it are finished first."""
    if flat.device.type != "cuda":
        raise ValueError(f"share_ipc needs a CUDA tensor, got one on {flat.device}")
    torch.cuda.synchronize(flat.device)
    _, args = reduce_tensor(flat)
    return {gpu_uuid(flat.device.index): args}


def open_ipc(handles: Mapping[str, tuple], device_index: int | None = None) -> torch.Tensor:
    """The buffer another process shared with :func:`share_ipc`, opened on this process's GPU.

    Processes number their visible GPUs differently (Ray sets ``CUDA_VISIBLE_DEVICES`` per actor), so
    the handle is found by physical UUID and its device index is rewritten to ours."""
    index = torch.cuda.current_device() if device_index is None else device_index
    uuid = gpu_uuid(index)
    if uuid not in handles:
        raise ValueError(f"no CUDA IPC buffer was shared on this GPU ({uuid}); buffers exist on "
                         f"{sorted(handles)}. weight_transport 'ipc' needs every rollout engine on a GPU "
                         "that a trainer rank also uses (placement: colocated)")
    args = list(handles[uuid])
    args[6] = index  # reduce_tensor's args[6] is the sender's device index
    return rebuild_cuda_tensor(*args)


def merge_handles(per_rank: Sequence[Sequence[dict[str, tuple]]]) -> list[dict[str, tuple]]:
    """Per-rank lists of per-bucket handle dicts -> one dict per bucket covering every rank's GPU."""
    counts = {len(h) for h in per_rank if h}
    if len(counts) > 1:
        raise RuntimeError(f"trainer ranks packed different numbers of buckets: {sorted(counts)}")
    merged: list[dict[str, tuple]] = [{} for _ in range(counts.pop() if counts else 0)]
    for handles in per_rank:
        for bucket, handle in zip(merged, handles):
            bucket.update(handle)
    return merged


# ------------------------------------------------------------------------------ NCCL broadcast


def nccl_communicator(host: str, port: int, rank: int, world_size: int, device: torch.device | int) -> Any:
    """One member of the trainer-rank-0 + rollout-engines NCCL group (vLLM's stateless group, so it
    does not touch either side's own ``torch.distributed`` state). Every member must call this
    concurrently; rank 0 (the trainer) hosts the rendezvous store at ``host:port``."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator  # optional: vllm extra
    from vllm.distributed.utils import StatelessProcessGroup  # optional: vllm extra

    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.index is None:  # PyNcclCommunicator compares tensor.device to its own: "cuda" != "cuda:0"
        device = torch.device("cuda", torch.cuda.current_device())
    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


def broadcast_buckets(comm: Any, layouts: Sequence[BucketLayout] | None,
                      tensors: Mapping[str, torch.Tensor] | None) -> Iterable[tuple[list, BucketLayout]]:
    """The NCCL transport, for both sides. Rank 0 passes its ``layouts`` and ``tensors``; receivers
    pass ``None`` for both and get the layouts over the group first. Yields ``(pairs, layout)`` per
    bucket. Receivers get a fresh buffer per bucket: vLLM's layerwise reload keeps references to the
    loaded tensors until their layer is complete, and a layer may span two buckets."""
    layouts = comm.group.broadcast_obj(list(layouts) if layouts is not None else None, src=0)
    if not layouts:
        return
    device = comm.device  # the communicator's own (indexed) device
    sending = comm.rank == 0
    send_buffer = torch.empty(max(x.nbytes for x in layouts), dtype=torch.uint8, device=device) if sending else None
    for layout in layouts:
        if sending:
            buffer = pack_bucket(tensors, layout, out=send_buffer)[:layout.nbytes]
        else:
            buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        comm.broadcast(buffer, src=0)
        if buffer.is_cuda:
            torch.cuda.current_stream(device).synchronize()
        yield unpack_bucket(buffer, layout), layout
