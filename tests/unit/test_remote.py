"""Deadlines on remote calls: a call that does not answer in time is an error naming the role, the actor
(pid, node), what it was doing, the setting that bounds it, and where the actor is stuck; a dead actor
is an error naming it. Real Ray actors on the embedded test cluster; the stuck one is a small actor made
for the purpose (this tests the waiting, not a role)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rayrl.remote import RemoteCallTimeout, RoleFailed, gather, identify


def _sleepers(count: int, **options):
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test file
    return [ray.remote(num_cpus=0, **options)(Sleeper).remote() for _ in range(count)]


class Sleeper:
    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "rested"

    def pid(self) -> int:
        return os.getpid()


def test_a_call_past_its_deadline_names_the_actor_and_its_stack(ray_cluster):
    import ray

    actors = _sleepers(2)
    try:
        who = identify("sleeper", actors, deadline_s=120)
        assert [w.index for w in who] == [0, 1] and all(w.pid and w.node_ip for w in who)
        assert gather([a.nap.remote(0) for a in actors], who=who, doing="napping", deadline_s=60,
                      setting="fault.timeouts.test_s") == ["rested", "rested"]
        start = time.monotonic()
        with pytest.raises(RemoteCallTimeout) as error:
            gather([actors[0].nap.remote(0), actors[1].nap.remote(60)], who=who, doing="napping", deadline_s=2,
                   setting="fault.timeouts.test_s")
        assert time.monotonic() - start < 45  # the deadline, plus taking the stack
        message = str(error.value)
        assert f"sleeper[1] (pid {who[1].pid} on {who[1].node_ip}) did not answer within 2 s while napping" in message
        assert "sleeper[0]" not in message.splitlines()[0]
        assert "fault.timeouts.test_s" in message
        assert "nap (" in message  # py-spy's stack of the stuck actor: in Sleeper.nap
    finally:
        for actor in actors:
            ray.kill(actor)


def test_a_dead_actor_is_named(ray_cluster):
    (actor,) = _sleepers(1, max_restarts=0)
    who = identify("sleeper", [actor], deadline_s=120)
    pending = actor.nap.remote(30)
    time.sleep(0.5)
    os.kill(who[0].pid, signal.SIGKILL)
    with pytest.raises(RoleFailed, match=r"sleeper\[0\] \(pid \d+ on .*\) died while napping"):
        gather([pending], who=who, doing="napping", deadline_s=60, setting="fault.timeouts.test_s")
