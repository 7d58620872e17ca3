"""Does asynchronous GRPO learn as well as sync? The quickstart's GRPO stage (from its SFT checkpoint,
on the addition task), at the same number of trained samples:

- sync vs async K=1 (``off_policy: tis``), ``--seeds`` seeds each: held-out accuracy at every eval;
- async K=4 with and without correction (``off_policy: tis`` vs ``none``), seed 0: what the correction buys.

Every run: ``rayrl train examples/grpo_async.yaml model.path=<sft>/final`` with ``rollout.mode`` /
``rollout.max_staleness`` / ``grpo.off_policy`` / ``seed`` overridden, ``--steps`` steps (16 prompts x 8
samples each), greedy eval on ``--eval-examples`` held-out prompts every ``--eval-every`` steps.

Run:  python benchmarks/async_learning.py [--steps 200] [--seeds 0 1 2] [--out benchmarks/results/async_learning.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recorded import heading, publish  # benchmarks/recorded.py

REPO = Path(__file__).resolve().parents[1]
QUIET = ["tracking.progress=false", "tracking.wandb.mode=disabled"]


def train(config: str, output_dir: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "rayrl.cli", "train", config, f"output_dir={output_dir}", *QUIET, *overrides]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--out", default=None, help="append the result section to this markdown file")
    args = parser.parse_args()
    runs = [("sync", seed, ["rollout.mode=sync"]) for seed in args.seeds]
    runs += [("async K=1, tis", seed, ["rollout.mode=async", "rollout.max_staleness=1", "grpo.off_policy=tis"])
             for seed in args.seeds]
    runs += [("async K=4, tis", args.seeds[0], ["rollout.mode=async", "rollout.max_staleness=4", "grpo.off_policy=tis"]),
             ("async K=4, none", args.seeds[0], ["rollout.mode=async", "rollout.max_staleness=4",
                                                  "grpo.off_policy=none"])]
    evals: dict[str, list[list[tuple[int, float]]]] = {}
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        train("examples/sft.yaml", Path(tmp) / "sft", [])
        print(f"sft: {time.time() - started:.0f} s", flush=True)
        for label, seed, overrides in runs:
            started = time.time()
            rows = train("examples/grpo_async.yaml", Path(tmp) / f"{label}-{seed}".replace(" ", "_").replace(",", ""),
                         [f"model.path={Path(tmp) / 'sft' / 'final'}", f"seed={seed}", f"train.max_steps={args.steps}",
                          f"eval.every_steps={args.eval_every}", f"eval.max_examples={args.eval_examples}",
                          "checkpoint.every_steps=0", *overrides])
            curve = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
            evals.setdefault(label, []).append(curve)
            walls.setdefault(label, []).append(time.time() - started)
            print(f"{label} seed {seed}: {curve} ({walls[label][-1]:.0f} s)", flush=True)
    steps = [step for step, _ in evals["sync"][0]]
    out = [heading(), "",
           f"From the quickstart's SFT checkpoint (`examples/sft.yaml`), `examples/grpo_async.yaml` for {args.steps} "
           f"steps of 16 prompts x 8 samples; greedy held-out accuracy on {args.eval_examples} prompts; mean over "
           "the seeds run (min-max in brackets); wall time per run includes start-up and evals.", "",
           "| run | seeds | " + " | ".join(f"step {s}" for s in steps) + " | wall s |",
           "|---|---|" + "---|" * len(steps) + "---|"]
    for label, curves in evals.items():
        cells = []
        for i in range(len(steps)):
            values = [curve[i][1] for curve in curves]
            cells.append(f"{statistics.mean(values):.3f}" + (f" [{min(values):.3f}-{max(values):.3f}]"
                                                              if len(values) > 1 else ""))
        out.append(f"| {label} | {len(curves)} | " + " | ".join(cells) + f" | {statistics.mean(walls[label]):.0f} |")
    final_sync = statistics.mean(c[-1][1] for c in evals["sync"])
    final_async = statistics.mean(c[-1][1] for c in evals["async K=1, tis"])
    out += ["", f"Final accuracy, async K=1 minus sync: {final_async - final_sync:+.3f} (target: within 0.03).", ""]
    publish(out, args.out)


if __name__ == "__main__":
    main()
