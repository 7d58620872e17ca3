"""Sync vs asynchronous GRPO, side by side in one run: trained samples per second, and who waits for whom.

Runs ``rayrl train examples/grpo_async.yaml`` (split placement: trainer 1 CPU, rollout worker 0.75,
verifier 0.25; eval and checkpoints off) once per mode: ``rollout.mode=sync``, then ``async`` at each
``--staleness`` K, on two workloads:

- ``tiny``: the built-in tiny model, 16 prompts x 8 samples x 6 new tokens (the example as is);
- ``larger``: a Llama from ``rayrl init-model --hidden-size H --num-layers L`` (random weights, so
  completions run to the token limit), ``--prompts`` x ``--group`` x ``--new-tokens``: sized so that
  generation and training each take a comparable share of the sync step on a 2-core machine.

Per run, over the steps after ``--warmup``: samples/s as trained samples over wall time (first to last
step end), and the medians of ``time/step``, ``time/trainer_wait`` (the trainer waiting for samples),
``time/rollout_idle`` (worker idle time, summed over workers), ``async/staleness_mean``,
``logprob_gap/sampler_trainer``.

Run:  python benchmarks/async_throughput.py [--steps 12] [--staleness 1 2] [--out benchmarks/results/async_throughput.md]
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
          "tracking.wandb.mode=disabled", "train.warmup_steps=0", "rollout.num_cpus=0.75", "trainer.num_cpus=1",
          "verifier.num_cpus=0.25"]
KEYS = ("time/step", "time/trainer_wait", "time/rollout_idle", "time/generate", "time/train",
        "async/staleness_mean", "logprob_gap/sampler_trainer")


def run(output_dir: Path, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "rayrl.cli", "train", "examples/grpo_async.yaml", f"output_dir={output_dir}",
               *COMMON, *overrides]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def summary(steps: list[dict], warmup: int) -> dict[str, float]:
    measured = steps[warmup:]
    # wall time from the end of the last warm-up step to the end of the last step
    wall = sum(r["time/step"] for r in measured)  # upper bound if steps overlap; replaced below when possible
    if all("_time" in r for r in steps):
        wall = steps[-1]["_time"] - steps[warmup - 1]["_time"]
    out = {"samples_per_s": sum(r["samples/trained"] for r in measured) / wall}
    out.update({key: statistics.median(r.get(key, 0.0) for r in measured) for key in KEYS})
    return out


def workload(name: str, args, model: str, overrides: list[str], out: list[str]) -> None:
    modes = [("sync", ["rollout.mode=sync"])] + [
        (f"async K={k}", ["rollout.mode=async", f"rollout.max_staleness={k}"]) for k in args.staleness]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, mode in modes:
            started = time.time()
            steps = run(Path(tmp) / label.replace(" ", "_").replace("=", ""),
                        [f"model.path={model}", f"train.max_steps={args.steps}", *overrides, *mode])
            results[label] = summary(steps, args.warmup)
            print(f"{name} {label}: {results[label]} ({time.time() - started:.0f} s)", flush=True)
    base = results["sync"]["samples_per_s"]
    out += [f"### {name}: {' '.join(overrides) or 'the example as is'}", "",
            "| mode | samples/s | vs sync | step s | trainer wait s | rollout idle s | generate s | train s "
            "| staleness mean | sampler/trainer gap |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        out.append(f"| {label} | {r['samples_per_s']:.2f} | {r['samples_per_s'] / base:.2f}x | {r['time/step']:.2f} "
                   f"| {r['time/trainer_wait']:.2f} | {r['time/rollout_idle']:.2f} | {r['time/generate']:.2f} "
                   f"| {r['time/train']:.2f} | {r['async/staleness_mean']:.2f} "
                   f"| {r['logprob_gap/sampler_trainer']:.4f} |")
    out.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["tiny", "larger"], default=None)
    parser.add_argument("--out", default=None, help="append the result section to this markdown file")
    args = parser.parse_args()
    out = [heading(), "",
           f"{args.steps} steps per run, the first {args.warmup} not measured; split placement (trainer 1 CPU, "
           "rollout 0.75, verifier 0.25) on one machine; samples/s = trained completions / wall time.", ""]
    if args.only in (None, "tiny"):
        workload("tiny", args, "rayrl:tiny-llama", [], out)
    if args.only in (None, "larger"):
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model"
            subprocess.run([sys.executable, "-m", "rayrl.cli", "init-model", str(model), "--hidden-size",
                            str(args.hidden_size), "--num-layers", str(args.num_layers)], check=True, cwd=REPO)
            from transformers import AutoModelForCausalLM

            params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters()) / 1e6
            workload(f"larger ({params:.1f}M-parameter Llama, hidden {args.hidden_size}, {args.num_layers} layers)",
                     args, str(model), [f"grpo.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
                                        f"rollout.max_new_tokens={args.new_tokens}", "train.micro_batch_size=16",
                                        "data.max_prompt_length=64"], out)
    publish(out, args.out)


if __name__ == "__main__":
    main()
