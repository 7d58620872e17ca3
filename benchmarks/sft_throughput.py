"""SFT throughput and memory: rayrl's stage against a plain single-process PyTorch loop.

Same tiny model, data, global batch (64 rows), optimizer (AdamW) and loss. Three measurements split
the difference:
  plain      one process: forward, masked NLL, backward, clip, AdamW step
  engine     the same through rayrl's PolicyTrainer (DeepSpeed engine) in this process, no Ray
  stage      `rayrl`'s SFT stage: the PolicyTrainer as a Ray actor, batches sent from the driver

Tokens/s is the median over steps after a warm-up, counting real (non-pad) tokens.

Run:  python benchmarks/sft_throughput.py [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load(threads: int):
    import torch
    from transformers import AutoTokenizer

    from rayrl.data.sft import load_sft_examples, sft_step_batcher
    from rayrl.tiny import resolve_model_path

    torch.set_num_threads(threads)
    model_path = resolve_model_path("rayrl:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, _ = load_sft_examples("rayrl:addition/sft-train", tokenizer, max_length=16)
    batcher = sft_step_batcher(examples, global_batch_size=64, micro_batch_size=64, world_size=1, seed=0,
                          shuffle=True, packing=False, max_length=16, pad_id=tokenizer.pad_token_id)
    return model_path, batcher


def bench_plain(model_path, batcher, steps: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    from rayrl.algorithms import sft_loss, token_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        batch = batcher.step_batches(step)[0][0]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.padding_mask()).logits
        logps = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
        loss, _ = sft_loss(logps, batch.loss_mask[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(batch.num_tokens / (time.perf_counter() - start))
    return rates


def bench_engine(model_path, batcher, steps: int, threads: int) -> list[float]:
    import socket

    from rayrl.actors.engine import TrainerSpec
    from rayrl.actors.policy_trainer import PolicyTrainer

    spec = TrainerSpec(model_path=model_path, world_size=1, micro_batch_size=64, grad_accum_steps=1,
                       total_steps=steps, lr=1e-3, lr_schedule="constant", num_threads=threads)
    trainer = PolicyTrainer(spec, rank=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    trainer.setup("127.0.0.1", port, 0, 1)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        batches = batcher.step_batches(step)[0]
        trainer.train_sft_step(batches, global_num_tokens=sum(b.num_loss_tokens for b in batches))
        rates.append(sum(b.num_tokens for b in batches) / (time.perf_counter() - start))
    trainer.shutdown()
    return rates


def bench_stage(steps: int, threads: int) -> tuple[list[float], float, float]:
    from rayrl.config import build_config
    from rayrl.sft import run_sft
    from rayrl.tracking import read_metrics

    with tempfile.TemporaryDirectory() as out:
        config = build_config({
            "algorithm": "sft", "output_dir": out, "model": {"path": "rayrl:tiny-llama"},
            "data": {"train": "rayrl:addition/sft-train", "eval": None, "max_length": 16},
            "train": {"max_steps": steps, "global_batch_size": 64, "micro_batch_size": 64, "lr": 1e-3,
                      "lr_schedule": "constant"},
            "trainer": {"world_size": 1, "num_cpus": threads},
            "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
        })
        result = run_sft(config)
        rows = [r for r in read_metrics(out) if "tokens_per_s" in r][20:]
        split = {key: statistics.median(r[key] for r in rows) for key in ("step_s", "time/data", "time/trainer_compute")}
        print(f"stage step {split['step_s'] * 1e3:.1f} ms = driver batching {split['time/data'] * 1e3:.1f} ms "
              f"+ trainer compute {split['time/trainer_compute'] * 1e3:.1f} ms "
              f"+ Ray call and transfer {(split['step_s'] - split['time/data'] - split['time/trainer_compute']) * 1e3:.1f} ms")
        return [r["tokens_per_s"] for r in rows], rows[-1]["memory/trainer_peak_rss_mb"], result.wall_s


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--which", default="plain,engine,stage")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model_path, batcher = load(args.threads)
    results = {}
    for which in args.which.split(","):
        if which == "plain":
            rates = bench_plain(model_path, batcher, args.steps)
            extra = {"peak_rss_mb": peak_rss_mb()}
        elif which == "engine":
            rates = bench_engine(model_path, batcher, args.steps, args.threads)
            extra = {"peak_rss_mb": peak_rss_mb()}
        else:
            rates, trainer_rss, wall = bench_stage(args.steps, args.threads)
            extra = {"peak_rss_mb": trainer_rss, "driver_peak_rss_mb": peak_rss_mb(), "wall_s": wall}
        rates = rates if which == "stage" else rates[args.warmup:]
        results[which] = {"tokens_per_s": statistics.median(rates), **extra}
    base = results.get("plain", {}).get("tokens_per_s")
    print(f"{'variant':<8} {'tokens/s':>10} {'vs plain':>9} {'peak RSS MB':>12}")
    for name, row in results.items():
        ratio = f"{row['tokens_per_s'] / base:.2f}" if base else "-"
        print(f"{name:<8} {row['tokens_per_s']:>10.0f} {ratio:>9} {row['peak_rss_mb']:>12.0f}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
