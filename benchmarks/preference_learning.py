"""Learning on the synthetic addition task: SFT, then DPO (full and LoRA) and a reward model from it.

Held-out task accuracy is exact match of greedy generation against the true sum on 500 unseen
prompts; preference accuracy is the fraction of held-out pairs whose implicit (DPO) or explicit (RM)
reward ranks the correct answer first. Everything through the real stages (Ray + DeepSpeed).

Run:  python benchmarks/preference_learning.py [--out runs/bench-pref] [--seeds 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
QUIET = ["tracking.wandb.mode=disabled", "tracking.progress=false"]


def last_eval(output_dir: Path, key: str) -> float:
    from rayrl.tracking import read_metrics

    return [row[key] for row in read_metrics(output_dir) if key in row][-1]


def first_eval(output_dir: Path, key: str) -> float:
    from rayrl.tracking import read_metrics

    return [row[key] for row in read_metrics(output_dir) if key in row][0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench-pref")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()

    from rayrl.config import load_config
    from rayrl.stages import run_stage

    out = Path(args.out)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = out / f"seed{seed}"

        def run(example: str, name: str, *overrides: str):
            config = load_config(REPO / "examples" / example,
                                 [f"output_dir={base / name}", f"seed={seed}", *QUIET, *overrides])
            return run_stage(config)

        sft = run("sft.yaml", "sft", "checkpoint.every_steps=0")
        model = f"model.path={sft.final_model}"
        dpo = run("dpo.yaml", "dpo", model, "checkpoint.every_steps=0")
        lora = run("dpo.yaml", "dpo-lora", model, "checkpoint.every_steps=0", "model.peft.method=lora",
                   "model.peft.r=16", "model.peft.alpha=32", "train.lr=2e-3")
        rm = run("rm.yaml", "rm", model)
        rows.append({
            "seed": seed,
            "sft_accuracy": last_eval(sft.output_dir, "eval/accuracy"), "sft_s": sft.wall_s,
            "dpo_accuracy": last_eval(dpo.output_dir, "eval/accuracy"),
            "dpo_pref_accuracy": last_eval(dpo.output_dir, "eval/rewards/accuracies"), "dpo_s": dpo.wall_s,
            "lora_accuracy": last_eval(lora.output_dir, "eval/accuracy"),
            "lora_pref_accuracy": last_eval(lora.output_dir, "eval/rewards/accuracies"), "lora_s": lora.wall_s,
            "rm_pair_accuracy_start": first_eval(rm.output_dir, "eval/accuracy"),
            "rm_pair_accuracy": last_eval(rm.output_dir, "eval/accuracy"), "rm_s": rm.wall_s,
        })
    header = ("seed", "SFT acc", "DPO acc", "DPO pref acc", "LoRA DPO acc", "LoRA pref acc", "RM pair acc (start->end)")
    print(" | ".join(header))
    for r in rows:
        print(f"{r['seed']} | {r['sft_accuracy']:.3f} ({r['sft_s']:.0f}s) | {r['dpo_accuracy']:.3f} ({r['dpo_s']:.0f}s) | "
              f"{r['dpo_pref_accuracy']:.3f} | {r['lora_accuracy']:.3f} ({r['lora_s']:.0f}s) | "
              f"{r['lora_pref_accuracy']:.3f} | {r['rm_pair_accuracy_start']:.3f}->{r['rm_pair_accuracy']:.3f} ({r['rm_s']:.0f}s)")


if __name__ == "__main__":
    main()
