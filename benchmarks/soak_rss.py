"""Memory soak: a long tiny GRPO run, every actor's resident memory sampled as it goes.

Runs ``rayrl train examples/grpo.yaml`` for ``--steps`` steps (the built-in tiny model and task, checkpoints
and eval off) in a subprocess, and samples the RSS of every Ray worker process of the run (the rollout
worker, the trainer, the verifier, the driver; the driver's descendants only, so other Ray jobs on the
machine do not count) every ``--every`` seconds: RSS and USS (the process's own,
unshared memory; RSS also counts the pages of Ray's shared object store a process has touched, which grow
as weight pushes land in new places of the store until the whole store has been touched). Reports, per
process: each at the end of warm-up (step 10% of the run) and at the last step, and the USS slope over the
second half (MB per 100 steps, from the run's own step count). A leak shows as a steady USS slope.

Run:  python benchmarks/soak_rss.py [--steps 1000] [--every 2] [--out benchmarks/results/soak_rss.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ROLES = ("RolloutWorker", "PolicyTrainer", "Verifier", "ReferenceModel", "RewardModel")


def role_of(process: psutil.Process, driver_pid: int) -> str | None:
    if process.pid == driver_pid:
        return "driver"
    try:
        title = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for role in ROLES:
        if f"ray::{role}" in title:
            return role
    return None


def steps_done(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--out", default=None, help="append a result section to this markdown file")
    parser.add_argument("--as-example", action="store_true",
                        help="keep the example's eval, checkpoint and sample-table settings (default: all off)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "rayrl.cli", "train", "examples/grpo.yaml", f"output_dir={out}",
                   f"train.max_steps={args.steps}", "tracking.progress=false", "tracking.wandb.mode=disabled"]
        if not args.as_example:
            command += ["checkpoint.every_steps=0", "eval.every_steps=0", "eval.at_start=false",
                        "tracking.sample_table_every=0"]
        started = time.time()
        driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: dict[str, list[tuple[int, float, float]]] = {}
        while driver.poll() is None:
            step = steps_done(out)
            seen: dict[str, tuple[float, float]] = {}
            try:  # this run's processes only: the driver and what it started (its embedded cluster)
                ours = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in ours:
                role = role_of(process, driver.pid)
                if role is None:
                    continue
                try:
                    memory = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, uss = seen.get(role, (0.0, 0.0))
                seen[role] = (rss + memory.rss / 2**20, uss + memory.uss / 2**20)
            for role, (rss, uss) in seen.items():
                samples.setdefault(role, []).append((step, rss, uss))
            time.sleep(args.every)
        wall = time.time() - started
        if driver.returncode != 0:
            sys.exit(f"the run failed (exit {driver.returncode}):\n{driver.stderr.read()[-3000:]}")

    lines = [f"steps {args.steps}, wall {wall / 60:.1f} min, sampled every {args.every:g} s", "",
             "| process | RSS after warm-up / at the end (MB) | USS after warm-up / at the end (MB) "
             "| USS slope, 2nd half (MB / 100 steps) |",
             "|---|---|---|---|"]
    for role, series in sorted(samples.items()):
        # While training only: from the end of warm-up (10% of the steps) to before the last step
        # (start-up loads models, the end exports and shuts down).
        training = [x for x in series if args.steps // 10 <= x[0] < args.steps] or series
        warm = training[0]
        series = training
        half = series[len(series) // 2:]
        slope = 0.0
        if len(half) > 2 and half[-1][0] > half[0][0]:
            xs, ys = [s for s, _, _ in half], [u for _, _, u in half]
            mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
            var = sum((x - mean_x) ** 2 for x in xs)
            slope = 100 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
        lines.append(f"| {role} | {warm[1]:.0f} / {series[-1][1]:.0f} | {warm[2]:.0f} / {series[-1][2]:.0f} "
                     f"| {slope:+.2f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d')}: `python benchmarks/soak_rss.py --steps {args.steps}"
                    f"{' --as-example' if args.as_example else ''}`\n\n{report}\n")


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    main()
