"""Packed buckets for the GPU weight transports, their config rules, and pass@k.

The packing and the layouts are the same code on CPU and GPU, so they are checked here on CPU; the
CUDA IPC round trip runs where a GPU is (and in benchmarks/gpu_check.py)."""

from __future__ import annotations

import pytest
import torch

from builtin_configs import build_config
from rayrl.config import ConfigError
from rayrl.cuda_transfer import ALIGN_BYTES, merge_handles, pack_bucket, plan_buckets, unpack_bucket
from rayrl.evaluation import pass_at_k, pass_at_k_metrics


def _named():
    torch.manual_seed(0)
    embed = torch.randn(10, 4)
    return [("embed.weight", embed), ("layer.q", torch.randn(4, 4)), ("layer.bias", torch.randn(3)),
            ("steps", torch.arange(5, dtype=torch.int64)), ("half", torch.randn(2, 3).to(torch.bfloat16)),
            ("lm_head.weight", embed)]  # tied: the same storage as embed.weight


def test_pack_unpack_round_trip_is_exact_and_aligned():
    named = _named()
    (layout,) = plan_buckets(named, bucket_bytes=1 << 20)
    assert layout.names == ("embed.weight", "layer.q", "layer.bias", "steps", "half")  # tied alias sent once
    assert all(offset % ALIGN_BYTES == 0 for offset in layout.offsets)
    assert layout.dtypes == ("float32", "float32", "float32", "int64", "bfloat16")
    flat = pack_bucket(dict(named), layout)
    assert flat.dtype == torch.uint8 and flat.numel() == layout.nbytes
    out = dict(unpack_bucket(flat, layout))
    for name, tensor in named[:-1]:
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name
    # views, not copies: writing the buffer changes what the receiver reads
    flat.zero_()
    assert out["layer.q"].abs().sum() == 0


def test_wire_dtype_casts_floats_only_and_halves_bytes():
    named = _named()
    (fp32,) = plan_buckets(named, 1 << 20)
    (bf16,) = plan_buckets(named, 1 << 20, wire_dtype=torch.bfloat16)
    assert bf16.dtypes == ("bfloat16", "bfloat16", "bfloat16", "int64", "bfloat16")
    big = [("w", torch.randn(256, 256))]
    assert plan_buckets(big, 1 << 20, wire_dtype=torch.bfloat16)[0].nbytes * 2 == plan_buckets(big, 1 << 20)[0].nbytes
    out = dict(unpack_bucket(pack_bucket(dict(named), bf16), bf16))
    assert torch.equal(out["layer.q"], named[1][1].to(torch.bfloat16))
    assert torch.equal(out["steps"], named[3][1])


def test_buckets_split_in_order_and_a_big_tensor_gets_its_own():
    named = [(f"p{i}", torch.full((64,), float(i))) for i in range(6)] + [("big", torch.zeros(1024))]
    layouts = plan_buckets(named, bucket_bytes=2 * 256)  # two 256-byte tensors per bucket
    assert [layout.names for layout in layouts] == [("p0", "p1"), ("p2", "p3"), ("p4", "p5"), ("big",)]
    for layout in layouts:
        for name, view in unpack_bucket(pack_bucket(dict(named), layout), layout):
            assert torch.equal(view, dict(named)[name])


def test_pack_names_the_offending_tensor():
    named = _named()
    (layout,) = plan_buckets(named, 1 << 20)
    tensors = dict(named)
    tensors["layer.q"] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="layer.q"):
        pack_bucket(tensors, layout)
    del tensors["layer.q"]
    with pytest.raises(KeyError, match="layer.q"):
        pack_bucket(tensors, layout)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bucket(torch.zeros(layout.nbytes, dtype=torch.float32), layout)


def test_merge_handles_covers_every_rank_gpu():
    merged = merge_handles([[{"gpu-a": (1,)}, {"gpu-a": (2,)}], [{"gpu-b": (3,)}, {"gpu-b": (4,)}]])
    assert merged == [{"gpu-a": (1,), "gpu-b": (3,)}, {"gpu-a": (2,), "gpu-b": (4,)}]
    with pytest.raises(RuntimeError, match="different numbers"):
        merge_handles([[{"a": ()}], [{"b": ()}, {"b": ()}]])


def _grpo(**overrides):
    return build_config({"algorithm": "grpo", **overrides})


def test_weight_transport_auto_resolution_and_rules():
    assert _grpo().resolved_weight_transport == "object_store"
    gpus = {"trainer": {"num_gpus": 1}, "rollout": {"num_gpus": 1}}
    assert _grpo(**gpus).resolved_weight_transport == "nccl"
    assert _grpo(**gpus, placement="colocated").resolved_weight_transport == "ipc"
    with pytest.raises(ConfigError, match="rollout.weight_transport: ipc .*num_gpus"):
        _grpo(rollout={"weight_transport": "ipc"}, placement="colocated")
    with pytest.raises(ConfigError, match="ipc needs placement: colocated"):
        _grpo(trainer={"num_gpus": 1}, rollout={"num_gpus": 1, "weight_transport": "ipc"})
    with pytest.raises(ConfigError, match="nccl cannot"):
        _grpo(trainer={"num_gpus": 1}, rollout={"num_gpus": 1, "weight_transport": "nccl"}, placement="colocated")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_ipc_share_and_open_in_process():
    from rayrl.cuda_transfer import open_ipc, share_ipc

    named = [(n, t.cuda()) for n, t in _named()]
    (layout,) = plan_buckets(named, 1 << 20)
    flat = pack_bucket(dict(named), layout, device="cuda")
    opened = open_ipc(share_ipc(flat))
    assert torch.equal(opened.cpu(), flat.cpu())


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples: any k hold a right one
    assert pass_at_k(4, 4, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    metrics = pass_at_k_metrics([[True, False, False, False], [False] * 4], ks=[1, 4])
    assert metrics == {"eval/pass@1": pytest.approx(0.125), "eval/pass@4": pytest.approx(0.5)}


def test_pass_k_must_fit_eval_samples():
    assert _grpo(eval={"samples": 4, "pass_k": [1, 4]}).eval.pass_k == [1, 4]
    with pytest.raises(ConfigError, match="eval.pass_k"):
        _grpo(eval={"samples": 4, "pass_k": [8]})


class _Wire:
    """What an NCCL group carries, for two stand-in members run one after the other."""

    def __init__(self):
        self.objects: list = []
        self.buffers: list = []


class _FakeGroup:
    def __init__(self, wire: _Wire, rank: int):
        self.wire, self.rank = wire, rank
        self.received = 0

    def broadcast_obj(self, obj, src):
        if self.rank == src:
            self.wire.objects.append(obj)
            return obj
        self.received += 1
        return self.wire.objects[self.received - 1]


class _FakeComm:
    """PyNcclCommunicator's surface used by broadcast_buckets (rank, device, group, broadcast)."""

    def __init__(self, wire: _Wire, rank: int):
        self.rank, self.device, self.wire = rank, torch.device("cpu"), wire
        self.group = _FakeGroup(wire, rank)
        self.count = 0

    def broadcast(self, tensor, src):
        if self.rank == src:
            self.wire.buffers.append(tensor.clone())
        else:
            tensor.copy_(self.wire.buffers[self.count])
            self.count += 1


def test_broadcast_buckets_sends_layouts_then_each_bucket_into_fresh_buffers():
    from rayrl.cuda_transfer import broadcast_buckets

    named = [(f"p{i}", torch.full((64,), float(i))) for i in range(5)]
    layouts = plan_buckets(named, bucket_bytes=2 * 256)
    wire = _Wire()
    sent = [layout for _, layout in broadcast_buckets(_FakeComm(wire, 0), layouts, dict(named))]
    assert sent == layouts and len(wire.buffers) == 3
    received = list(broadcast_buckets(_FakeComm(wire, 1), None, None))
    assert [layout for _, layout in received] == layouts  # the layouts came over the group
    # every bucket kept its own buffer: earlier views stay valid after later buckets arrive
    # (vLLM's layerwise reload holds them until a layer is complete)
    got = {name: view for pairs, _ in received for name, view in pairs}
    assert all(torch.equal(got[name], tensor) for name, tensor in named)
