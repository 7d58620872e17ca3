"""The main job: a tiny model and a synthetic verifiable task, post-trained stage by stage.

Today: base -> SFT -> DPO (the RL stage joins when it lands). Prints a table of held-out
accuracy and wall time per stage and writes ``OUTPUT/summary.json``:
``[{"stage": ..., "eval_accuracy": ..., "wall_s": ...}, ...]`` in stage order.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayrl.config import apply_overrides, build_config
from rayrl.tracking import read_metrics

# SFT on the flawed demos, stopped while it still imitates them imperfectly (see data/synthetic.py).
QUICKSTART_SFT = {
    "algorithm": "sft",
    "model": {"path": "rayrl:tiny-llama"},
    "data": {"train": "rayrl:addition/sft-train", "eval": "rayrl:addition/sft-eval", "max_length": 16},
    "train": {"max_steps": 600, "global_batch_size": 64, "micro_batch_size": 64, "lr": 1e-3,
              "warmup_steps": 20, "lr_schedule": "cosine", "min_lr_ratio": 0.1},
    "eval": {"every_steps": 200, "max_examples": 500},
    "trainer": {"world_size": 1, "num_cpus": 2},
}


# DPO with an SFT term on pairs that cover every prompt (see data/synthetic.py), from the SFT model.
QUICKSTART_DPO = {
    "algorithm": "dpo",
    "data": {"train": "rayrl:addition/prefs-train", "eval": "rayrl:addition/prefs-eval", "max_length": 16},
    "dpo": {"loss_type": "sigmoid", "beta": 0.1, "sft_weight": 1.0},
    "train": {"max_steps": 150, "global_batch_size": 32, "micro_batch_size": 32, "lr": 1e-4,
              "warmup_steps": 5, "lr_schedule": "constant"},
    "eval": {"every_steps": 50, "max_examples": 500, "generation_data": "rayrl:addition/sft-eval"},
    "trainer": {"world_size": 1, "num_cpus": 2},
}


def run_quickstart(output_dir: str | Path, overrides: list[str] | None = None) -> list[dict]:
    from rayrl.dpo import run_dpo
    from rayrl.sft import run_sft

    output_dir = Path(output_dir)
    overrides = overrides or []
    sft_data = apply_overrides({**QUICKSTART_SFT, "output_dir": str(output_dir / "sft")}, overrides)
    sft = run_sft(build_config(sft_data))
    dpo_data = apply_overrides({**QUICKSTART_DPO, "output_dir": str(output_dir / "dpo"),
                                "model": {"path": str(sft.final_model)}}, overrides)
    dpo = run_dpo(build_config(dpo_data))
    sft_evals = [row for row in read_metrics(sft.output_dir) if "eval/accuracy" in row]
    dpo_evals = [row for row in read_metrics(dpo.output_dir) if "eval/accuracy" in row]
    summary = [
        {"stage": "base", "eval_accuracy": sft_evals[0]["eval/accuracy"], "wall_s": 0.0},
        {"stage": "sft", "eval_accuracy": sft_evals[-1]["eval/accuracy"], "wall_s": round(sft.wall_s, 1)},
        {"stage": "dpo", "eval_accuracy": dpo_evals[-1]["eval/accuracy"], "wall_s": round(dpo.wall_s, 1)},
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"\nwrote {output_dir / 'summary.json'}; final model: {dpo.final_model}")
    return summary


def format_table(summary: list[dict]) -> str:
    lines = [f"{'stage':<8} {'held-out accuracy':>18} {'wall s':>8}"]
    lines += [f"{row['stage']:<8} {row['eval_accuracy']:>18.3f} {row['wall_s']:>8.1f}" for row in summary]
    return "\n".join(lines)
