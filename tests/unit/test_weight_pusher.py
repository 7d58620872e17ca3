"""The controller side of the weight sync (WeightPusher) over each transport, with stand-in roles.

The roles here only record what they are asked: this checks the orchestration (who is called, in what
order, with which ranks and handles; buffers released even when a worker fails). The transports'
data paths are tested elsewhere: object_store against the real engine (integration tests), packing on
CPU (test_weight_transports.py), CUDA IPC in benchmarks/gpu_check.py."""

from __future__ import annotations

import pytest

from rayrl.cuda_transfer import BucketLayout
from rayrl.weight_sync import WeightPusher

LAYOUT = BucketLayout(("w",), ("bfloat16",), ((2, 2),), (0,), 256)


class FakeTrainer:
    def __init__(self, rank: int):
        self.rank = rank
        self.calls: list = []

    def share_weights_ipc(self, bucket_bytes, wire_dtype):
        self.calls.append(("share", bucket_bytes, wire_dtype))
        return [{"handles": {f"gpu-{self.rank}": ("args", self.rank, i)}, "layout": LAYOUT} for i in range(2)]

    def release_shared_weights(self):
        self.calls.append(("release",))

    def weight_broadcast_address(self):
        return "127.0.0.1", 4242

    def init_weight_broadcast(self, host, port, world_size):
        self.calls.append(("init", host, port, world_size))

    def broadcast_weights(self, bucket_bytes, wire_dtype):
        self.calls.append(("broadcast", bucket_bytes, wire_dtype))
        return 1000 if self.rank == 0 else 0

    def get_calls(self):
        return self.calls


class FakeWorker:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list = []

    def update_weights_ipc(self, version, shared):
        if self.fail:
            raise RuntimeError("engine refused the push")
        self.calls.append(("ipc", version, shared))

    def init_weight_broadcast(self, host, port, rank_offset, world_size):
        self.calls.append(("init", host, port, rank_offset, world_size))

    def update_weights_nccl(self, version):
        self.calls.append(("nccl", version))

    def get_calls(self):
        return self.calls


def _roles(ray, ranks: int, workers: int, fail: bool = False):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    trainers = [ray.remote(FakeTrainer).remote(r) for r in range(ranks)]
    pool = [ray.remote(FakeWorker).remote(fail) for _ in range(workers)]
    return trainers, pool


def test_ipc_push_merges_every_rank_handles_and_releases(ray_cluster):
    import ray

    trainers, workers = _roles(ray, ranks=2, workers=2)
    pusher = WeightPusher("ipc", trainers, workers, bucket_bytes=64, wire_dtype="bfloat16")
    _, nbytes = pusher.push(3)
    assert nbytes == 2 * LAYOUT.nbytes
    for calls in ray.get([w.get_calls.remote() for w in workers]):
        ((kind, version, shared),) = calls
        assert (kind, version) == ("ipc", 3)
        # each bucket carries both ranks' buffers, so each engine finds the one on its own GPU
        assert [b["handles"] for b in shared] == [{"gpu-0": ("args", 0, i), "gpu-1": ("args", 1, i)} for i in range(2)]
    for calls in ray.get([t.get_calls.remote() for t in trainers]):
        assert calls == [("share", 64, "bfloat16"), ("release",)]


def test_ipc_buffers_are_released_when_a_worker_fails(ray_cluster):
    import ray

    trainers, workers = _roles(ray, ranks=1, workers=1, fail=True)
    with pytest.raises(ray.exceptions.RayTaskError, match="engine refused"):
        WeightPusher("ipc", trainers, workers, bucket_bytes=64).push(1)
    assert ray.get(trainers[0].get_calls.remote())[-1] == ("release",)


def test_nccl_group_is_formed_once_with_workers_after_rank_0(ray_cluster):
    import ray

    trainers, workers = _roles(ray, ranks=2, workers=3)
    pusher = WeightPusher("nccl", trainers, workers, bucket_bytes=64, wire_dtype="bfloat16")
    assert pusher.push(1)[1] == 1000
    pusher.push(2)
    rank0, rank1 = ray.get([t.get_calls.remote() for t in trainers])
    assert rank0 == [("init", "127.0.0.1", 4242, 4), ("broadcast", 64, "bfloat16"), ("broadcast", 64, "bfloat16")]
    assert rank1 == [("broadcast", 64, "bfloat16")] * 2  # joins the ZeRO-3 gather, never the NCCL group
    calls = ray.get([w.get_calls.remote() for w in workers])
    assert [c[0] for c in calls] == [("init", "127.0.0.1", 4242, i + 1, 4) for i in range(3)]
    assert all(c[1:] == [("nccl", 1), ("nccl", 2)] for c in calls)


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="unknown weight transport"):
        WeightPusher("rdma", [], [], bucket_bytes=1)
