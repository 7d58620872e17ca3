"""LoadHandoff: with partial rollouts a push arrives on its own thread while a generate owns the engine;
the load must run on the generating thread, between engine steps (vLLM is never entered from two
threads), and a load while the engine is free must run at once."""

from __future__ import annotations

import threading
import time

import pytest

from rayrl.actors.rollout_worker import Completion, LoadHandoff


def run_in_thread(fn):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()))
    thread.start()
    return thread, box


def test_a_load_while_the_engine_is_free_runs_at_once_on_its_own_thread():
    handoff = LoadHandoff()
    assert handoff.load(lambda: threading.get_ident()) == threading.get_ident()


def test_a_load_during_an_engine_call_runs_on_the_owner_between_steps():
    handoff = LoadHandoff()
    ran_on: list[int] = []
    steps_before_load = []
    with handoff.engine_call():
        owner = threading.get_ident()
        thread, box = run_in_thread(lambda: handoff.load(lambda: ran_on.append(threading.get_ident()) or "loaded"))
        for step in range(200):  # the "engine steps": the load is queued, then run between two of them
            handoff.run_queued()
            if ran_on:
                steps_before_load.append(step)
                break
            time.sleep(0.005)
        thread.join(5)
    assert ran_on == [owner] and box["value"] == "loaded" and steps_before_load


def test_loads_left_at_the_end_of_an_engine_call_run_before_it_lets_go():
    handoff = LoadHandoff()
    ran = threading.Event()
    with handoff.engine_call():
        thread, box = run_in_thread(lambda: handoff.load(lambda: ran.set() or 7))
        while not handoff.queued:
            time.sleep(0.001)
        assert not ran.is_set()
    assert ran.is_set()
    thread.join(5)
    assert box["value"] == 7


def test_a_failed_load_raises_on_the_pushing_thread_and_the_engine_call_goes_on():
    handoff = LoadHandoff()
    errors: list[BaseException] = []

    def push():
        try:
            handoff.load(lambda: (_ for _ in ()).throw(RuntimeError("checksum mismatch")))
        except RuntimeError as exc:
            errors.append(exc)

    with handoff.engine_call():
        thread = threading.Thread(target=push)
        thread.start()
        deadline = time.monotonic() + 5
        while not errors and time.monotonic() < deadline:
            handoff.run_queued()
            time.sleep(0.001)
    thread.join(5)
    assert [str(e) for e in errors] == ["checksum mismatch"]


def test_an_engine_call_waits_until_ready_and_names_what_it_waited_for():
    handoff = LoadHandoff()
    version = {"v": 0}
    thread, _ = run_in_thread(lambda: (time.sleep(0.05), handoff.load(lambda: version.update(v=1))))
    with handoff.engine_call(lambda: version["v"] >= 1):
        assert version["v"] == 1
    thread.join(5)
    with pytest.raises(TimeoutError, match="the push of policy version 2 did not come within 0 s"):
        with handoff.engine_call(lambda: version["v"] >= 2, wait_s=0.05, waiting_for="the push of policy version 2"):
            pass


def test_token_versions_follow_the_recorded_changes():
    completion = Completion(prompt_index=0, sample_index=0, prompt_ids=[1], token_ids=[5, 6, 7, 8, 9],
                            logprobs=[-1.0] * 5, text="", finish_reason="length", policy_version=3,
                            version_changes=[(2, 4), (4, 6)])
    assert completion.token_versions() == [3, 3, 4, 4, 6]
    completion.version_changes = []
    assert completion.token_versions() == [3] * 5
    completion.version_changes = [(0, 5)]  # loaded before its first token
    assert completion.token_versions() == [5] * 5
