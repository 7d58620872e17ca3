"""Fault tolerance with real processes killed for real: a GRPO run on the embedded cluster whose rollout
worker is SIGKILLed, whose verifier is SIGKILLed and whose replacement rollout worker is then SIGSTOPped
(it stops answering) keeps going: every step trains on a full batch and the restarts are counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_grpo_loop import grpo_config

from transformers import AutoTokenizer

from rayrl.config import load_config
from rayrl.rl import load_rl_data
from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def actor_pids(class_name: str) -> list[int]:
    """Live processes of Ray actors of ``class_name`` (Ray titles them ``ray::ClassName[.method]``), not
    their forked helpers (which inherit the title)."""
    def titled(process) -> bool:
        try:
            cmdline = process.cmdline()
            return bool(cmdline) and cmdline[0].split(".")[0] == f"ray::{class_name}" and process.status() != "zombie"
        except psutil.Error:
            return False

    return [p.pid for p in psutil.process_iter() if titled(p) and not (p.parent() and titled(p.parent()))]


def steps_logged(output_dir) -> int:
    try:
        return max([r["step"] for r in read_metrics(output_dir) if "loss" in r], default=0)
    except FileNotFoundError:
        return 0


class Chaos(threading.Thread):
    """After step n is logged, do something to a process of an actor class: (n, class, signal)."""

    def __init__(self, output_dir, plan):
        super().__init__(daemon=True)
        self.output_dir, self.plan, self.done, self.stop = output_dir, list(plan), [], threading.Event()

    def run(self):
        for after_step, class_name, sig in self.plan:
            while steps_logged(self.output_dir) < after_step:
                if self.stop.wait(0.05):  # promptly: an async run's later steps may take 0.1 s each
                    return
            deadline = time.monotonic() + 120  # a replacement may still be starting
            while not (pids := [p for p in actor_pids(class_name) if p not in [pid for _, pid, _ in self.done]]):
                assert time.monotonic() < deadline, class_name
                if self.stop.wait(0.2):
                    return
            victim = max(pids)  # of several (trainer ranks), the last started
            os.kill(victim, sig)
            self.done.append((class_name, victim, sig))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_grpo_survives_dead_and_stuck_stateless_actors(ray_cluster, tmp_path, tiny_model_dir, mode):
    """In both loops; async: the worker dies or stops between or during its chunks, while a push's
    loads are in flight, and the scheduler thread and the loop's thread may both see it fail."""
    from rayrl.rl import run_rl

    output_dir = tmp_path / "chaos"
    # Async: the steps after the worker is stopped may already be sampled, so leave several that are not.
    max_steps = 5 if mode == "sync" else 8
    config = grpo_config(output_dir, tiny_model_dir, train={"max_steps": max_steps, "micro_batch_size": 8, "lr": 1e-3},
                         rollout={"num_workers": 1, "mode": mode}, verifier={"num_workers": 1, "num_cpus": 0.1},
                         trainer={"world_size": 1, "num_cpus": 0.5}, eval={"at_start": False},
                         # short enough to find the stopped worker soon, long enough for a first (compiling) step
                         fault={"timeouts": {"generate_s": 60.0, "generate_per_token_s": 0.0, "sync_s": 30.0,
                                            "startup_s": 180.0}})
    chaos = Chaos(output_dir, [(1, "RolloutWorker", signal.SIGKILL), (2, "Verifier", signal.SIGKILL),
                               (3, "RolloutWorker", signal.SIGSTOP)])
    chaos.start()
    try:
        started = time.monotonic()
        run_rl(config)
    finally:
        chaos.stop.set()
        for _, pid, sig in chaos.done:  # never leave a stopped process behind
            if sig == signal.SIGSTOP:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert [name for name, _, _ in chaos.done] == ["RolloutWorker", "Verifier", "RolloutWorker"]
    steps = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, max_steps + 1))
    assert all(r["samples/trained"] == 16 for r in steps)  # 4 prompts x 4 samples, every step
    last = steps[-1]  # at least the failures caused here (a slow machine may miss a deadline more)
    assert last["faults/rollout/restarts"] >= 2 and last["faults/rollout/reissued"] >= 2
    assert last["faults/verifier/restarts"] >= 1 and last["faults/verifier/reissued"] >= 1
    # the killed processes are gone; the stopped one was ended by the run, not left stopped
    for _, pid, _ in chaos.done:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert time.monotonic() - started < 600


def rank_kill_config(output_dir, tiny_model_dir, mode: str, placement: str = "split"):
    """5 GRPO steps, two DeepSpeed ranks, a checkpoint every 2 steps; async at max_staleness 0 (the sync loop,
    bit for bit), so both modes compare with one uninterrupted sync run."""
    return grpo_config(output_dir, tiny_model_dir, train={"max_steps": 5, "micro_batch_size": 8, "lr": 1e-3},
                       rollout={"num_workers": 1, "mode": mode, "max_staleness": 0}, placement=placement,
                       verifier={"num_workers": 1, "num_cpus": 0.1},
                       eval={"at_start": False}, checkpoint={"every_steps": 2})


@pytest.fixture(scope="module")
def calm_rank_run(ray_cluster, tmp_path_factory, tiny_model_dir):
    """The uninterrupted sync run's steps, per placement (run once each)."""
    from rayrl.rl import run_rl

    runs: dict[str, list[dict]] = {}

    def steps(placement: str) -> list[dict]:
        if placement not in runs:
            config = rank_kill_config(tmp_path_factory.mktemp("calm"), tiny_model_dir, "sync", placement)
            runs[placement] = [r for r in read_metrics(run_rl(config).output_dir) if "loss" in r]
        return runs[placement]

    return steps


@pytest.mark.parametrize("mode,placement", [("sync", "split"), ("async", "split"), ("sync", "colocated")])
def test_grpo_rebuilds_its_trainer_group_when_a_rank_dies(ray_cluster, calm_rank_run, tmp_path, tiny_model_dir, capfd,
                                                          mode, placement):
    """One of two DeepSpeed ranks SIGKILLed after step 3: the run rebuilds the group, goes back to its
    newest checkpoint and trains the steps after it again, as an uninterrupted run does; every step is
    logged once, the restart counted. Async: the scheduler's thread (and what it sampled ahead) is
    stopped and a new one starts from the checkpoint's step. Colocated: the rollout worker, which lived
    in the old group's bundle, starts again in the new one's."""
    from rayrl.rl import run_rl

    output_dir = tmp_path / "rank"
    config = rank_kill_config(output_dir, tiny_model_dir, mode, placement)
    chaos = Chaos(output_dir, [(3, "PolicyTrainer", signal.SIGKILL)])
    chaos.start()
    try:
        run_rl(config)
    finally:
        chaos.stop.set()
    assert [name for name, _, _ in chaos.done] == ["PolicyTrainer"]
    steps = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]  # steps after the checkpoint logged once, again
    # back to the step-2 checkpoint (or, if the kill landed late in step 4, the step-4 one)
    restarts = [r["faults/trainer/restarts"] for r in steps]
    assert restarts[:2] == [0, 0] and restarts[-1] == 1 and restarts == sorted(restarts)
    assert all(r["samples/trained"] == 16 for r in steps)
    assert "rebuilding the trainer group (1 of fault.max_trainer_restarts=1)" in capfd.readouterr().err
    # from the checkpoint on, the steps are the uninterrupted run's
    for key in ("loss", "reward/mean", "grad_norm", "logprob_gap/sampler_trainer"):
        assert [r[key] for r in steps] == pytest.approx([r[key] for r in calm_rank_run(placement)], rel=1e-5,
                                                        abs=1e-6), key
    assert not psutil.pid_exists(chaos.done[0][1]) or psutil.Process(chaos.done[0][1]).status() == "zombie"


def test_a_killed_driver_leaves_no_process_and_resumes(tmp_path, tiny_model_dir):
    """`rayrl train` (async, max_staleness 1) on its own embedded cluster, SIGKILLed after step 3: every
    process it started is gone soon after (the agents Ray itself would leave orphaned included);
    `checkpoint.resume=true` continues from the step-2 checkpoint, logs each step once, and trains each
    step's prompts once: the groups in flight when the driver died are issued again, none lost."""
    output_dir = tmp_path / "driver"
    overrides = [f"output_dir={output_dir}", f"model.path={tiny_model_dir}", "train.max_steps=6",
                 "checkpoint.every_steps=2", "eval.at_start=false", "eval.every_steps=0", "tracking.progress=false",
                 "tracking.wandb.mode=disabled", "grpo.prompts_per_step=4", "rollout.group_size=4",
                 "train.micro_batch_size=16", "rollout.mode=async", "rollout.max_staleness=1",
                 "tracking.sample_table_every=1", "tracking.sample_table_rows=16"]
    command = [sys.executable, "-m", "rayrl.cli", "train", "examples/grpo.yaml", *overrides]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while steps_logged(output_dir) < 3 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read()[-2000:]
        started = {p.pid: p.create_time() for p in psutil.Process(driver.pid).children(recursive=True)}
        assert len(started) > 3  # Ray's own processes and the actors
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()

    def alive(pid, created):
        try:
            process = psutil.Process(pid)
            return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 60
    while any(alive(*item) for item in started.items()) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(pid, " ".join(psutil.Process(pid).cmdline())[:80]) for pid, created in started.items() if alive(pid, created)]
    assert not left, left

    resumed = subprocess.run([*command, "checkpoint.resume=true"], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(output_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Each step trained its own prompts (the last table logged for it: the resumed run's from step 3 on).
    trained: dict[int, list[str]] = {}
    for row in map(json.loads, (output_dir / "samples.jsonl").read_text().splitlines()):
        trained[row["step"]] = trained.get(row["step"], []) + [row["prompt"]]
    config = load_config(REPO / "examples/grpo.yaml", overrides)
    data = load_rl_data(config, AutoTokenizer.from_pretrained(tiny_model_dir))
    for step in range(1, 7):
        expected = sorted(p.prompt for p in data.order.step_rows(step - 1) for _ in range(4))
        assert sorted(trained[step][-16:]) == expected, step
