"""The trainer's forward-only passes against trainer ranks, and the on-policy skip, side by side in one run.

Runs ``rayrl train examples/grpo.yaml`` on a Llama from ``rayrl init-model --hidden-size H --num-layers L``
(random weights: completions run to the token limit, so every step has the same work), three ways:

- ``1 rank x 1 CPU, separate pass``: ``trainer.world_size=1``, ``trainer.num_cpus=1`` (one thread) and
  ``grpo.mini_batches=2``, so the loop computes the "old" log-probs in a separate pass (``time/reference``).
  Before the data-parallel passes, 2 ranks took at least this long: every rank computed the whole batch;
- ``1 rank x 2 CPUs``: the same on one rank with two threads (the machine's cores in one process);
- ``2 ranks x 1 CPU, separate pass``: each rank computes its half of the batch in one call;
- ``2 ranks x 1 CPU, on-policy``: ``grpo.mini_batches=1``: one optimizer step per batch, no separate pass
  (the training forward's detached log-probs are the old ones).

The rollout worker and verifier ask for no CPUs (they share the cores; generation is not what is
measured). Medians over the steps after ``--warmup``.

Run:  python benchmarks/logprob_ranks.py [--steps 8] [--out benchmarks/results/logprob_ranks.md]
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
COMMON = ["eval.at_start=false", "eval.every_steps=0", "checkpoint.every_steps=0", "tracking.progress=false",
          "tracking.wandb.mode=disabled", "train.warmup_steps=0", "rollout.num_cpus=0", "verifier.num_cpus=0",
          "grpo.kl_coef=0.0", "data.max_prompt_length=64"]
RUNS = {
    "1 rank x 1 CPU, separate pass": ["trainer.world_size=1", "trainer.num_cpus=1", "grpo.mini_batches=2"],
    "1 rank x 2 CPUs, separate pass": ["trainer.world_size=1", "trainer.num_cpus=2", "grpo.mini_batches=2"],
    "2 ranks x 1 CPU, separate pass": ["trainer.world_size=2", "trainer.num_cpus=1", "grpo.mini_batches=2"],
    "2 ranks x 1 CPU, on-policy (no pass)": ["trainer.world_size=2", "trainer.num_cpus=1", "grpo.mini_batches=1"],
}


def run(output_dir: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "rayrl.cli", "train", "examples/grpo.yaml", f"output_dir={output_dir}",
               *COMMON, *overrides]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="append the result section to this markdown file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        subprocess.run([sys.executable, "-m", "rayrl.cli", "init-model", str(model), "--hidden-size",
                        str(args.hidden_size), "--num-layers", str(args.num_layers)], check=True, cwd=REPO)
        workload = [f"model.path={model}", f"train.max_steps={args.steps}", f"grpo.prompts_per_step={args.prompts}",
                    f"rollout.group_size={args.group}", f"rollout.max_new_tokens={args.new_tokens}",
                    "train.micro_batch_size=8"]
        for label, overrides in RUNS.items():
            started = time.time()
            steps = run(Path(tmp) / f"run{len(results)}", workload + overrides)[args.warmup:]
            results[label] = {key: statistics.median(r[key] for r in steps)
                              for key in ("time/reference", "time/train", "time/step")}
            print(f"{label}: {results[label]} ({time.time() - started:.0f} s)", flush=True)
    base = results["1 rank x 1 CPU, separate pass"]["time/reference"]
    out = [heading(), "",
           f"Llama hidden {args.hidden_size}, {args.num_layers} layers (random weights), {args.prompts} prompts x "
           f"{args.group} samples x {args.new_tokens} new tokens, micro-batch 8; medians over steps "
           f"{args.warmup + 1}-{args.steps}. `log-prob pass` is `time/reference` (the old log-probs; no KL term).", "",
           "| run | log-prob pass s | vs 1 rank x 1 CPU | train s | step s |", "|---|---|---|---|---|"]
    for label, r in results.items():
        out.append(f"| {label} | {r['time/reference']:.3f} | {r['time/reference'] / base:.2f}x | {r['time/train']:.2f} "
                   f"| {r['time/step']:.2f} |")
    publish(out + [""], args.out)


if __name__ == "__main__":
    main()
