"""PPO step time by phase and peak memory by role, next to GRPO's (and RLOO's) on the same task with
the same sequences per step (prompts_per_step x group_size) and the same new tokens.

  ppo    policy (DeepSpeed) + critic (DeepSpeed) + reward-model actor + reference + vLLM rollout,
         GAE over the critic's values, KL in the rewards; a weight-0 math_answer verifier only measures
  grpo   policy + reference (same KL coefficient, as a loss term) + verifier + vLLM rollout; no critic,
         no reward model
  rloo   the same roles as grpo, leave-one-out advantages (same cost; run with --with-rloo)

Phases are the per-step seconds the RL loop logs in metrics.jsonl (time/generate, time/reward,
time/reference, time/values, time/train, time/train_critic, time/sync, time/step). "train" is the
whole update phase; PPO's critic steps run alongside the policy's, and "of which critic" is their wall
time inside it (overlapped, not added). Medians over the steps after a warm-up. Peak memory: a sampler
thread polls the RSS of every Ray worker process of this driver (grouped by actor class from the
``ray::Class.method`` process title, children folded into their actor) every 0.2 s; per role the
peak, and the peak of the sum over all roles (RSS double-counts shared pages such as the torch
libraries, so the sum is an upper bound; Ray's own agents are listed but not summed).

Run:  python benchmarks/ppo_step.py --model runs/sft/final --reward-model runs/rm/final [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS, GROUP, NEW_TOKENS, MICRO = 16, 4, 6, 32
WARMUP = 3
RAY_SYSTEM = {"DashboardAgent", "RuntimeEnvAgent"}  # Ray's own per-node processes, not roles: not summed
PHASES = ("generate", "reward", "reference", "values", "train", "of which critic", "sync", "step")


class RSSSampler(threading.Thread):
    """Peak RSS (MB) per Ray actor class among this process's descendants, and of their sum."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, float] = {}
        self.peak_total = 0.0
        self._halt = threading.Event()

    @staticmethod
    def _role(proc) -> str | None:
        try:
            title = (proc.cmdline() or [""])[0]
        except Exception:
            return None
        if not title.startswith("ray::"):
            return None
        role = title[len("ray::"):].split(".")[0].split(" ")[0]
        return None if role in ("IDLE", "") else role

    def sample(self) -> None:
        import psutil

        now: dict[str, float] = {}
        me = psutil.Process()
        procs = me.children(recursive=True)
        roles = {p.pid: self._role(p) for p in procs}
        for proc in procs:
            role, parent = roles.get(proc.pid), proc
            while role is None:  # a child of an actor (e.g. an engine process) counts for the actor
                try:
                    parent = parent.parent()
                except Exception:
                    parent = None
                if parent is None or parent.pid == me.pid:
                    break
                role = roles.get(parent.pid)
            if role is None:
                continue
            try:
                now[role] = now.get(role, 0.0) + proc.memory_info().rss / 2**20
            except Exception:
                continue
        for role, mb in now.items():
            self.peak[role] = max(self.peak.get(role, 0.0), mb)
        self.peak_total = max(self.peak_total, sum(mb for role, mb in now.items() if role not in RAY_SYSTEM))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run(kind: str, model: str, reward_model: str, steps: int, kl: float) -> dict:
    from rayrl.config import build_config
    from rayrl.stages import run_stage
    from rayrl.tracking import read_metrics

    common = {
        "output_dir": None, "model": {"path": model}, "data": {"train": "rayrl:addition/prompts-train", "eval": None},
        "rollout": {"backend": "vllm", "num_cpus": 0.25, "group_size": GROUP, "max_new_tokens": NEW_TOKENS},
        "train": {"max_steps": steps, "micro_batch_size": MICRO, "lr": 1e-5},
        "trainer": {"num_cpus": 0.5}, "reference": {"num_cpus": 0.25}, "verifier": {"num_cpus": 0.1},
        "eval": {"at_start": False}, "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    if kind == "ppo":
        data = {**common, "algorithm": "ppo", "reward_model": {"path": reward_model, "num_cpus": 0.25},
                "rewards": [{"fn": "math_answer", "name": "correct", "weight": 0.0}],
                "critic": {"num_cpus": 0.5}, "ppo": {"prompts_per_step": PROMPTS, "kl_coef": kl}}
    else:
        data = {**common, "algorithm": "grpo",
                "grpo": {"prompts_per_step": PROMPTS, "kl_coef": kl, "advantage": "group" if kind == "grpo" else kind}}
    sampler = RSSSampler()
    with tempfile.TemporaryDirectory() as out:
        data["output_dir"] = out
        config = build_config(data)
        sampler.start()
        started = time.perf_counter()
        try:
            run_stage(config)
        finally:
            sampler.stop()
        wall = time.perf_counter() - started
        rows = [r for r in read_metrics(out) if "time/step" in r][WARMUP:]
    if not rows:
        raise SystemExit(f"{kind}: no steps after the warm-up; use --steps > {WARMUP}")

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    phases = {"generate": med("time/generate"), "reward": med("time/reward"), "reference": med("time/reference"),
              "values": med("time/values"), "train": med("time/train"), "of which critic": med("time/train_critic"),
              "sync": med("time/sync"), "step": med("time/step")}
    tokens = statistics.median(r["tokens_per_s"] * r["time/step"] for r in rows)
    logged = {"trainer": max(r.get("memory/trainer_peak_rss_mb", 0.0) for r in rows),
              "critic": max(r.get("memory/critic_peak_rss_mb", 0.0) for r in rows)}
    return {"phases": phases, "tokens_per_step": tokens, "wall_s": wall, "rss_peak_mb": sampler.peak,
            "rss_peak_total_mb": sampler.peak_total, "logged_peak_rss_mb": logged}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="an SFT checkpoint (e.g. runs/sft/final)")
    parser.add_argument("--reward-model", required=True, help="the rm stage's export (e.g. runs/rm/final)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--kl", type=float, default=0.05, help="KL coefficient (both: a reference actor)")
    parser.add_argument("--with-rloo", action="store_true", help="also run RLOO (same roles as GRPO)")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    kinds = ["ppo", "grpo"] + (["rloo"] if args.with_rloo else [])
    results = {kind: run(kind, args.model, args.reward_model, args.steps, args.kl) for kind in kinds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    load = os.getloadavg()
    print(f"{PROMPTS} prompts x {GROUP} samples x <= {NEW_TOKENS} new tokens; medians over steps "
          f"{WARMUP + 1}..{args.steps}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| phase | " + " | ".join(f"{k} s" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for phase in PHASES:
        print(f"| {phase} | " + " | ".join(f"{results[k]['phases'][phase]:.3f}" for k in kinds) + " |")
    print("| tokens per step | " + " | ".join(f"{results[k]['tokens_per_step']:.0f}" for k in kinds) + " |")
    print(f"ppo step / grpo step = {results['ppo']['phases']['step'] / results['grpo']['phases']['step']:.2f}")
    roles = sorted({r for k in kinds for r in results[k]["rss_peak_mb"]})
    print("\n| peak RSS MB | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for role in roles:
        print(f"| {role} | " + " | ".join(f"{results[k]['rss_peak_mb'].get(role, 0.0):.0f}" if role in
                                        results[k]["rss_peak_mb"] else "-" for k in kinds) + " |")
    print("| all roles (peak of the sum) | " + " | ".join(f"{results[k]['rss_peak_total_mb']:.0f}" for k in kinds)
          + " |")
    for k in kinds:
        print(f"{k}: wall {results[k]['wall_s']:.1f} s; logged peak RSS {results[k]['logged_peak_rss_mb']}")


if __name__ == "__main__":
    main()
