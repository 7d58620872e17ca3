"""DPO step throughput and trainer peak memory: full fine-tuning vs LoRA, reference precomputed vs
computed alongside (a frozen copy for full fine-tuning, the adapter-disabled base for LoRA).

A mid-size Llama (hidden 512, 8 layers, random weights) so that weights, gradients and optimizer
states show up in the memory figures; the synthetic addition preference pairs; 32 pairs per step.
Tokens/s is the median over steps after warm-up; memory is the trainer actor's peak RSS.

Run:  python benchmarks/dpo_throughput.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "full, reference precomputed": {"peft": None, "reference": "precompute"},
    "full, reference alongside (frozen copy)": {"peft": None, "reference": "alongside"},
    "LoRA r=8, reference precomputed": {"peft": {"method": "lora", "r": 8}, "reference": "precompute"},
    "LoRA r=8, reference = adapter disabled": {"peft": {"method": "lora", "r": 8}, "reference": "alongside"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    args = parser.parse_args()

    import ray

    from rayrl.config import build_config
    from rayrl.dpo import run_dpo
    from rayrl.tiny import init_model
    from rayrl.tracking import read_metrics

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    model_dir = init_model(work / "model", hidden_size=args.hidden_size, num_layers=args.num_layers)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    rows = []
    for name, variant in VARIANTS.items():
        config = build_config({
            "algorithm": "dpo", "output_dir": str(work / name.replace(" ", "_")),
            "model": {"path": str(model_dir), "peft": variant["peft"]},
            "data": {"train": "rayrl:addition/prefs-train", "max_length": 16, "eval": None},
            "dpo": {"reference": variant["reference"]},
            "train": {"max_steps": args.steps, "global_batch_size": 32, "micro_batch_size": 32, "lr": 1e-5,
                      "lr_schedule": "constant"},
            "trainer": {"num_cpus": 2}, "eval": {"at_start": False},
            "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
        })
        result = run_dpo(config)
        steps = [r for r in read_metrics(result.output_dir) if "tokens_per_s" in r]
        rows.append((name, statistics.median(r["tokens_per_s"] for r in steps[args.warmup:]),
                     statistics.median(r["step_s"] for r in steps[args.warmup:]),
                     steps[-1]["memory/trainer_peak_rss_mb"], result.wall_s))
    ray.shutdown()
    print(f"model: hidden {args.hidden_size}, {args.num_layers} layers; 32 pairs/step; {args.steps} steps")
    print(f"{'variant':<42} {'tokens/s':>9} {'step s':>7} {'trainer peak RSS MB':>20} {'stage wall s':>13}")
    for name, tps, step_s, rss, wall in rows:
        print(f"{name:<42} {tps:>9.0f} {step_s:>7.3f} {rss:>20.0f} {wall:>13.1f}")


if __name__ == "__main__":
    main()
