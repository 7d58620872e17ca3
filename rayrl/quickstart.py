"""The main job: a tiny model and a synthetic verifiable task, post-trained stage by stage.

base -> SFT -> DPO -> GRPO, each stage starting from the previous one's final model. Prints a table of held-out
accuracy and wall time per stage and writes ``OUTPUT/summary.json``:
``[{"stage": ..., "eval_accuracy": ..., "wall_s": ...}, ...]`` in stage order.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayrl.config import apply_overrides, build_config
from rayrl.stages import run_stage
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


# DPO with an SFT term on pairs that cover every prompt (see data/synthetic.py), from the SFT model;
# kept short so that GRPO, which samples at temperature 1, still has room to improve on it.
QUICKSTART_DPO = {
    "algorithm": "dpo",
    "data": {"train": "rayrl:addition/prefs-train", "eval": "rayrl:addition/prefs-eval", "max_length": 16},
    "dpo": {"loss_type": "sigmoid", "beta": 0.1, "sft_weight": 1.0},
    "train": {"max_steps": 30, "global_batch_size": 32, "micro_batch_size": 32, "lr": 1e-4,
              "warmup_steps": 5, "lr_schedule": "constant"},
    "eval": {"every_steps": 10, "max_examples": 500, "generation_data": "rayrl:addition/sft-eval"},
    "trainer": {"world_size": 1, "num_cpus": 2},
}


# GRPO with the exact-answer verifier: rewards the carry the demos got wrong. Sampling at 0.7 keeps the
# samples near what greedy decoding would say (at 1.0, GRPO after this DPO stage stalled near 0.88).
# Log-probs at T=0.7 scale the policy gradient by 1/T: lr 7e-5 (1e-4 ended at 0.928 / 0.952 on seeds
# 0 / 1, 7e-5 at 0.962 / 0.968).
QUICKSTART_GRPO = {
    "algorithm": "grpo",
    "data": {"train": "rayrl:addition/prompts-train", "eval": "rayrl:addition/prompts-eval"},
    "rewards": [{"fn": "math_answer", "name": "correct"}],
    "rollout": {"backend": "vllm", "num_cpus": 0.5, "group_size": 8, "temperature": 0.7, "max_new_tokens": 6,
                "kv_cache_gib": 0.5},
    "grpo": {"prompts_per_step": 32},
    "train": {"max_steps": 150, "micro_batch_size": 128, "lr": 7e-5},
    "eval": {"every_steps": 50, "max_examples": 500},
    # The fastest layout on one small machine (benchmarks/results/trl_compare.md): the engine and the
    # trainer take turns on the whole machine (one bundle of 2 CPUs: the trainer trains on 2 threads
    # while the engine sleeps); the built-in verifier scores in its actor's process and needs no CPU.
    "placement": "colocated",
    "trainer": {"world_size": 1, "num_cpus": 1.5},
    "verifier": {"num_cpus": 0},
}

STAGES = (("sft", QUICKSTART_SFT), ("dpo", QUICKSTART_DPO), ("grpo", QUICKSTART_GRPO))


def run_quickstart(output_dir: str | Path, overrides: list[str] | None = None) -> list[dict]:
    output_dir = Path(output_dir)
    summary: list[dict] = []
    model_path = "rayrl:tiny-llama"
    for name, settings in STAGES:
        data = apply_overrides({**settings, "output_dir": str(output_dir / name), "model": {"path": model_path}},
                               overrides or [])
        result = run_stage(build_config(data))
        evals = [row["eval/accuracy"] for row in read_metrics(result.output_dir) if "eval/accuracy" in row]
        if not summary:  # the base model's accuracy: the first stage's eval before any step
            summary.append({"stage": "base", "eval_accuracy": evals[0], "wall_s": 0.0})
        summary.append({"stage": name, "eval_accuracy": evals[-1], "wall_s": round(result.wall_s, 1)})
        model_path = str(result.final_model)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(output_dir, [name for name, _ in STAGES], output_dir / "curves.png")
    print(format_table(summary))
    print(f"\nwrote {output_dir / 'summary.json'} and {output_dir / 'curves.png'}; final model: {model_path}")
    return summary


def format_table(summary: list[dict]) -> str:
    lines = [f"{'stage':<8} {'held-out accuracy':>18} {'wall s':>8}"]
    lines += [f"{row['stage']:<8} {row['eval_accuracy']:>18.3f} {row['wall_s']:>8.1f}" for row in summary]
    return "\n".join(lines)


def plot_curves(output_dir: Path, stages: list[str], path: Path) -> Path:
    """Held-out accuracy across the stages (one x axis of cumulative steps) and GRPO's reward."""
    import matplotlib  # slow: matplotlib (the CLI imports this module)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # slow: matplotlib; after choosing the Agg backend

    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for stage in stages:
        rows = read_metrics(output_dir / stage)
        evals = [(offset + r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        if evals:
            acc_ax.plot(*zip(*evals), marker="o", label=stage)
        if stage == "grpo":
            rewards = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
            if rewards:
                reward_ax.plot(*zip(*rewards), label="reward/mean (train samples)")
        offset += max((r.get("step", 0) for r in rows), default=0)
    acc_ax.set(title="held-out accuracy (greedy, exact answer)", xlabel="step (cumulative over stages)",
               ylabel="accuracy", ylim=(0, 1))
    acc_ax.legend()
    reward_ax.set(title="GRPO reward", xlabel="GRPO step", ylabel="mean reward", ylim=(0, 1))
    reward_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
