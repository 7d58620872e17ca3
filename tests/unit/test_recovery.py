"""RestartingActors on real Ray actors: a call whose actor dies (its process exits) or stops answering
is re-issued on a replacement, every result lands once and in order, and restarts are bounded."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest
from ray import cloudpickle

from rayrl.recovery import Call, RestartingActors
from rayrl.remote import ActorUnusable, RemoteCallTimeout, RoleFailed, gather

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file


class Worker:
    """Squares numbers. ``fail_once`` names a file: the first call to see it missing creates it and fails
    in the given way (the process exits, or hangs); later calls (on the replacement) succeed."""

    def __init__(self, index: int, fail_once: str | None = None, how: str = "exit"):
        self.index, self.fail_once, self.how = index, fail_once, how

    def square(self, x: int) -> tuple[int, int, int]:
        if self.fail_once is not None and _first_to_create(self.fail_once):
            if self.how == "exit":
                os._exit(1)
            if self.how == "unusable":
                raise ActorUnusable("the engine died")
            time.sleep(600)
        if x < 0:
            raise ValueError("negative input")
        return x * x, self.index, os.getpid()


def _first_to_create(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def worker_set(tmp_path, count=2, max_restarts=3, how="exit", fail=True):
    import ray

    started = []

    def start(i):
        started.append(i)
        return ray.remote(Worker).options(num_cpus=0).remote(i, str(tmp_path / "failed") if fail else None, how)

    return RestartingActors("square", start, count, max_restarts=max_restarts, startup_s=60,
                            setting="fault.timeouts.test_s"), started


def calls(n, deadline_s=60.0):
    return [Call(lambda actor, x=x: actor.square.remote(x), deadline_s, f"squaring {x}") for x in range(n)]


def test_a_dead_actor_is_replaced_and_its_call_reissued(ray_cluster, tmp_path):
    actors, started = worker_set(tmp_path)
    restarted = []
    actors.after_restart.append(restarted.append)
    first_pids = [who.pid for who in actors.who]
    results = actors.map(calls(6))
    assert [r[0] for r in results] == [x * x for x in range(6)]  # each call's result once, in order
    assert actors.restarts == 1 and actors.reissued == 1
    assert len(restarted) == 1 and started == [0, 1, restarted[0]]  # the same index, a new actor
    assert actors.who[restarted[0]].pid not in first_pids
    assert actors.metrics() == {"faults/square/restarts": 1.0, "faults/square/reissued": 1.0}


def test_a_stuck_actor_misses_its_deadline_and_is_replaced(ray_cluster, tmp_path):
    actors, _ = worker_set(tmp_path, count=1, how="hang")
    stuck_pid = actors.who[0].pid
    start = time.monotonic()
    results = actors.map(calls(3, deadline_s=3.0))
    assert [r[0] for r in results] == [0, 1, 4]
    assert time.monotonic() - start < 60
    assert actors.restarts == 1 and actors.who[0].pid != stuck_pid


def test_restarts_are_bounded(ray_cluster, tmp_path):
    actors, _ = worker_set(tmp_path, count=1, max_restarts=0)
    with pytest.raises(RoleFailed) as error:
        actors.map(calls(2))
    message = str(error.value)
    assert "square[0] (pid" in message and "died while squaring 0" in message
    assert "fault.max_restarts: 0" in message
    assert [who.role for who in error.value.who] == ["square"]


def test_an_error_of_the_method_itself_is_not_a_restart(ray_cluster, tmp_path):
    actors, _ = worker_set(tmp_path, fail=False)
    with pytest.raises(ValueError, match="negative input"):
        actors.map([Call(lambda actor: actor.square.remote(-1), 60.0, "squaring -1")])
    assert actors.restarts == 0


def test_pinned_calls_go_to_their_actor(ray_cluster, tmp_path):
    actors, _ = worker_set(tmp_path, count=2, fail=False)
    results = actors.call_all(lambda actor: actor.square.remote(3), "squaring 3", 60.0)
    assert [index for _, index, _ in results] == [0, 1]


def test_retry_replaces_the_actors_a_failure_names(ray_cluster, tmp_path):
    actors, _ = worker_set(tmp_path, count=2, fail=False)
    attempts = []

    def operation():
        attempts.append(1)
        if len(attempts) == 1:
            raise RemoteCallTimeout("square[1] did not answer", who=[actors.who[1]])
        return "pushed"

    old_pid = actors.who[1].pid
    assert actors.retry(operation) == "pushed"
    assert len(attempts) == 2 and actors.restarts == 1 and actors.who[1].pid != old_pid
    # a failure of another role is not ours to fix
    other = RoleFailed("trainer[0] died", who=[])
    with pytest.raises(RoleFailed):
        actors.retry(lambda: (_ for _ in ()).throw(other))


def test_resize_adds_up_to_date_actors_and_removes_the_last(ray_cluster, tmp_path):
    actors, started = worker_set(tmp_path, count=1, fail=False)
    caught_up = []
    actors.after_restart.append(caught_up.append)
    actors.resize(3)
    assert len(actors) == 3 and [who.index for who in actors.who] == [0, 1, 2] and caught_up == [1, 2]
    assert [index for _, index, _ in actors.call_all(lambda actor: actor.square.remote(2), "squaring 2", 60.0)] \
        == [0, 1, 2]
    removed = actors.who[2].pid
    actors.resize(1)
    assert len(actors) == 1 and len(actors.who) == 1 and started == [0, 1, 2]
    deadline = time.monotonic() + 30
    while psutil.pid_exists(removed) and psutil.Process(removed).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(removed) or psutil.Process(removed).status() == psutil.STATUS_ZOMBIE


def test_an_actor_that_says_it_is_unusable_is_replaced(ray_cluster, tmp_path):
    actors, _ = worker_set(tmp_path, count=1, how="unusable")
    assert [r[0] for r in actors.map(calls(2))] == [0, 1]
    assert actors.restarts == 1


class Peer:
    """Two ranks of a collective: one dies, the other then fails with an error about its peer."""

    def die_later(self):
        time.sleep(1.0)
        os._exit(1)

    def fail_first(self):
        time.sleep(0.3)
        raise ConnectionError("connection closed by peer")


def test_gather_reports_the_death_behind_a_peers_error(ray_cluster):
    import ray

    from rayrl.remote import ActorIdentity

    ranks = [ray.remote(Peer).options(num_cpus=0).remote() for _ in range(2)]
    who = [ActorIdentity("PolicyTrainer", i) for i in range(2)]
    with pytest.raises(RoleFailed, match=r"PolicyTrainer\[1\].*died while a step") as error:
        gather([ranks[0].fail_first.remote(), ranks[1].die_later.remote()], who=who, doing="a step",
               deadline_s=60, setting="fault.timeouts.trainer_s")
    assert [w.index for w in error.value.who] == [1]


def test_a_nan_gap_fails_the_sync_probe():
    import torch

    from rayrl.sync_guard import max_logprob_gap

    mask = torch.tensor([[False, True, True]])
    trainer = torch.tensor([[0.0, -1.0, -2.0]])
    assert max_logprob_gap(trainer, torch.tensor([[5.0, -1.5, -2.0]]), mask) == 0.5  # masked-out positions ignored
    assert max_logprob_gap(trainer, torch.tensor([[0.0, float("nan"), -2.0]]), mask) == float("inf")
    assert max_logprob_gap(trainer, torch.tensor([[0.0, float("-inf"), -2.0]]), mask) == float("inf")
