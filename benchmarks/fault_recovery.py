"""Chaos run: GRPO with actors killed for real every few steps, against an undisturbed run of the same seed.

Runs ``rayrl train examples/grpo.yaml`` (the built-in tiny model and addition task; eval, checkpoints and
sample tables off) twice for ``--steps`` steps: once undisturbed, once with a stateless actor killed
every ``--kill-every`` steps (roles in turn: the rollout worker by SIGKILL, the verifier by SIGKILL, the
rollout worker by SIGSTOP: it stops answering and must be found by its deadline). Reports:

- per role and signal, what recovery cost: the time of the step the signal landed in (``time/step``)
  minus the run's median step time;
- the restarts the run counted (``faults/<role>/restarts``), and that every step trained on a full batch;
- the reward curve of both runs (mean over windows of ``--kill-every`` steps);
- the weight-sync guard per push: the probe check's median time and the checksum throughput.

Run:  python benchmarks/fault_recovery.py [--steps 200] [--kill-every 20] [--sft] [--out benchmarks/results/fault_recovery.md]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from recorded import heading, publish  # benchmarks/recorded.py

REPO = Path(__file__).resolve().parents[1]
PLAN = (("RolloutWorker", signal.SIGKILL), ("Verifier", signal.SIGKILL), ("RolloutWorker", signal.SIGSTOP))
ROLE = {"RolloutWorker": "rollout", "Verifier": "verifier"}


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def step_rows(output_dir: Path) -> list[dict]:
    return [r for r in metrics(output_dir) if "loss" in r]


def actor_pids(driver: int, class_name: str) -> list[int]:
    """This run's live processes of an actor class (Ray titles them ``ray::Class[.method]``), not their
    forked helpers (the verifier's scoring children inherit the title)."""
    def titled(process) -> bool:
        try:
            cmdline = process.cmdline()
            return bool(cmdline) and cmdline[0].split(".")[0] == f"ray::{class_name}" \
                and process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED)
        except psutil.Error:
            return False

    try:
        processes = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in processes if titled(p) and not (p.parent() and titled(p.parent()))]


def run(steps: int, kill_every: int, out: Path, model: str) -> tuple[list[dict], list[tuple[str, int, float, int]], float]:
    """One run; returns its step rows, the signals sent (class, signal, time, step) and its wall time."""
    command = [sys.executable, "-m", "rayrl.cli", "train", "examples/grpo.yaml", f"output_dir={out}", f"model.path={model}",
               f"train.max_steps={steps}", "tracking.progress=false", "tracking.wandb.mode=disabled",
               "checkpoint.every_steps=0", "eval.every_steps=0", "eval.at_start=false", "tracking.sample_table_every=0",
               "fault.timeouts.generate_s=30", "fault.timeouts.sync_s=30", f"fault.max_restarts={steps}"]
    started = time.time()
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent: list[tuple[str, int, float, int]] = []
    next_kill = kill_every if kill_every else None
    while driver.poll() is None:
        done = len(step_rows(out))
        if next_kill is not None and done >= next_kill and next_kill < steps:
            class_name, sig = PLAN[len(sent) % len(PLAN)]
            pids = actor_pids(driver.pid, class_name)
            if pids:
                os.kill(pids[0], sig)
                sent.append((class_name, sig, time.time(), done))
            next_kill += kill_every
        time.sleep(0.1)
    wall = time.time() - started
    if driver.returncode != 0:
        sys.exit(f"the run failed (exit {driver.returncode}):\n{driver.stderr.read()[-3000:]}")
    return step_rows(out), sent, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kill-every", type=int, default=20)
    parser.add_argument("--sft", action="store_true",
                        help="start from an SFT checkpoint trained first (examples/sft.yaml), as the quickstart does: "
                             "the random tiny model earns no reward, so its reward curve stays flat")
    parser.add_argument("--out", default=None, help="append a result section to this markdown file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = "rayrl:tiny-llama"
        if args.sft:
            subprocess.run([sys.executable, "-m", "rayrl.cli", "train", "examples/sft.yaml", f"output_dir={tmp}/sft",
                            "tracking.progress=false", "tracking.wandb.mode=disabled"], cwd=REPO, check=True,
                           capture_output=True)
            model = f"{tmp}/sft/final"
        calm, _, calm_wall = run(args.steps, 0, Path(tmp) / "calm", model)
        chaos_dir = Path(tmp) / "chaos"
        chaos, sent, chaos_wall = run(args.steps, args.kill_every, chaos_dir, model)

    median_step = statistics.median(r["time/step"] for r in chaos)
    lines = [f"tiny GRPO (examples/grpo.yaml{', from the SFT checkpoint of examples/sft.yaml' if args.sft else ''}), {args.steps} steps, a signal every {args.kill_every} steps; "
             f"wall {calm_wall / 60:.1f} min undisturbed, {chaos_wall / 60:.1f} min with the signals; "
             f"median step {median_step:.2f} s", ""]
    full = all(r["samples/trained"] == calm[0]["samples/trained"] for r in chaos)
    last = chaos[-1]
    lines.append(f"steps trained: {len(chaos)} of {args.steps}, every one on a full batch: {full}; restarts counted: "
                 + ", ".join(f"{role} {int(last.get(f'faults/{role}/restarts', 0))}" for role in ("rollout", "verifier"))
                 + f"; signals sent: {len(sent)}")
    lines += ["", "| signal | sent | step cost (s): time/step of the next step - median |", "|---|---|---|"]
    by_step = {r["step"]: r for r in chaos}
    costs: dict[str, list[float]] = {}
    for class_name, sig, _, done in sent:
        hit = by_step.get(done + 1)
        if hit is None:
            continue
        name = f"{ROLE[class_name]} {signal.Signals(sig).name}"
        costs.setdefault(name, []).append(hit["time/step"] - median_step)
    for name, values in costs.items():
        lines.append(f"| {name} | {len(values)} | median {statistics.median(values):.1f}, max {max(values):.1f} |")
    window = max(1, args.kill_every)
    lines += ["", f"reward/mean per window of {window} steps:", "",
              "| steps | undisturbed | with the signals |", "|---|---|---|"]
    for start in range(0, args.steps, window):
        a = [r["reward/mean"] for r in calm[start:start + window]]
        b = [r["reward/mean"] for r in chaos[start:start + window]]
        if a and b:
            lines.append(f"| {start + 1}-{start + len(a)} | {statistics.fmean(a):.3f} | {statistics.fmean(b):.3f} |")
    verify = [r["time/sync_verify"] for r in calm if "time/sync_verify" in r]
    sync = [r["time/sync"] for r in calm]
    bucket = np.random.default_rng(0).random(16 << 20, dtype=np.float32)  # 64 MiB
    from rayrl.weight_sync import tensor_checksums

    t = time.perf_counter()
    for _ in range(5):
        tensor_checksums({"w": bucket})
    crc_gb_s = 5 * bucket.nbytes / (time.perf_counter() - t) / 1e9
    lines += ["", f"weight-sync guard per push (undisturbed run): probe check median {statistics.median(verify) * 1e3:.0f} ms "
              f"(push median {statistics.median(sync) * 1e3:.0f} ms); checksums {crc_gb_s:.1f} GB/s on each side "
              f"(Qwen2.5-0.5B in bf16, 0.99 GB: about {0.99 / crc_gb_s:.2f} s per push on the trainer and on each worker)"]
    publish(["", heading(), "", *lines], args.out)


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    main()
