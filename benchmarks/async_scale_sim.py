"""Async RL at cluster scale, by simulation: rayrl's own rollout scheduler (``SyncRollouts`` /
``AsyncRollouts`` over ``RolloutPool`` and ``CallStream``, real Ray calls) driving stand-in rollout
workers, with a stand-in trainer of fixed step time, for 8, 64 and 256 workers.

- A stand-in worker is a handle onto one asyncio Ray actor (``EngineFarm``) that serves every simulated
  engine at once: a chunk of prompts x samples "generates" for the longest of its completions' times
  (an engine decodes its batch together), each drawn from a log-normal distribution (median
  ``--median-s``, sigma ``--sigma``: the long tail of reasoning lengths), capped at ``--cap`` x median
  (max_new_tokens). Completions carry the policy version the farm serves when they finish.
- The stand-in loop is the RL loop's skeleton: ``take(step)`` -> train (sleep ``--train-s``) -> push
  (sleep ``--push-s``: the export; the engines serve the new version from their next chunk on) ->
  ``publish``.
- The batch grows with the cluster: ``--prompts-per-worker`` prompts per worker per step, ``--group``
  samples each; rewards are random (the scheduler does not look at them).

Reported per (workers, mode): trained samples/s, the trainer's idle fraction (time waiting for samples
/ wall), the driver's CPU time per step (main + scheduler + scoring threads: the controller's cost) as
a share of the step, and the mean staleness.

Run:  python benchmarks/async_scale_sim.py [--workers 8 64 256] [--staleness 1 2 4] [--steps 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from types import SimpleNamespace

import numpy as np
import ray

from rayrl.actors.rollout_worker import Completion, SamplingSettings
from rayrl.config import TimeoutConfig
from rayrl.data.rollout import PromptRow
from rayrl.recovery import RestartingActors
from rayrl.remote import ActorIdentity
from rayrl.rewards.scoring import ScoreResult
from rayrl.rl_roles import RolloutPool
from rayrl.rl_sampling import StepSampling
from rayrl.rollout_scheduler import AsyncRollouts, SyncRollouts

from recorded import heading, publish  # benchmarks/recorded.py


@ray.remote(num_cpus=0)
class EngineFarm:
    """Every simulated engine: a chunk sleeps for its longest completion's drawn time."""

    def __init__(self, median_s: float, sigma: float, cap: float, seed: int):
        self.median_s, self.sigma, self.cap = median_s, sigma, cap
        self.rng = np.random.default_rng(seed)
        self.version = 0

    def set_version(self, version: int) -> None:
        self.version = version

    async def generate(self, prompts: list[list[int]], sampling: SamplingSettings,
                       min_version: int | None = None) -> list[Completion]:
        version = self.version  # a chunk finishes under the weights it started with
        times = np.minimum(self.rng.lognormal(np.log(self.median_s), self.sigma, size=len(prompts) * sampling.n),
                           self.cap * self.median_s)
        await asyncio.sleep(float(times.max()))
        return [Completion(i, k, p, [5, 6], [-1.0, -1.0], "x", "stop", version)
                for i, p in enumerate(prompts) for k in range(sampling.n)]


class SimWorker:
    """A rollout-worker handle: ``worker.generate.remote(prompts, sampling)`` as the pool calls it."""

    def __init__(self, farm):
        self.generate = farm.generate


def score(rows: list[PromptRow], completions: list[Completion]) -> ScoreResult:
    total = [float(random.random() < 0.5) for _ in completions]
    return ScoreResult(total=total, per_function={"f": total}, failures={"f": 0}, timeouts={"f": 0},
                       failed={"f": [False] * len(total)})


def simulate(workers: int, staleness: int | None, args) -> dict[str, float]:
    farm = EngineFarm.remote(args.median_s, args.sigma, args.cap, args.seed)
    actors = RestartingActors("rollout", lambda i: None, 0, max_restarts=0, startup_s=60, setting="")
    for i in range(workers):
        actors.actors.append(SimWorker(farm))
        actors.who.append(ActorIdentity("rollout", i))
    pool = RolloutPool(actors, TimeoutConfig())
    per_step = args.prompts_per_worker * workers
    prompts = [PromptRow(f"p{i}", [1 + i % 50], {}) for i in range(per_step * args.steps)]
    settings = SimpleNamespace(prompts_per_step=per_step, dynamic_sampling=False, max_sampling_rounds=1)
    sampling = SamplingSettings(n=args.group, max_new_tokens=2)

    def new_step(step: int) -> StepSampling:
        return StepSampling(settings, args.group, args.seed, step, prompts[step * per_step:(step + 1) * per_step],
                            prompts, sampling)

    if staleness is None:
        rollouts = SyncRollouts(pool, score, new_step)
    else:
        rollouts = AsyncRollouts(pool, score, new_step, first_step=0, total_steps=args.steps, max_staleness=staleness,
                                 group_size=args.group, take_deadline_s=600)
    waits, lags, ends = [], [], []
    cpu_start = time.process_time()
    start = time.perf_counter()
    try:
        for step in range(args.steps):
            samples, flow = rollouts.take(step)
            waits.append(flow.trainer_wait_s)
            lags += [step - c.policy_version for c in samples.rollout.completions]
            time.sleep(args.train_s)
            time.sleep(args.push_s)
            ray.get(farm.set_version.remote(step + 1), timeout=60)
            rollouts.publish(step + 1)
            ends.append(time.perf_counter())
    finally:
        rollouts.stop()
        ray.kill(farm)
    cpu = time.process_time() - cpu_start
    measured = slice(args.warmup, None)
    wall = ends[-1] - ends[args.warmup - 1]
    steps = args.steps - args.warmup
    return {"samples_per_s": steps * per_step * args.group / wall, "idle": sum(waits[measured]) / wall,
            "cpu_share": cpu / (ends[-1] - start) , "cpu_per_step_ms": 1000 * cpu / args.steps,
            "step_s": wall / steps, "staleness": float(np.mean(lags))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts-per-worker", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--median-s", type=float, default=0.25)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--cap", type=float, default=16.0)
    parser.add_argument("--train-s", type=float, default=2.0)
    parser.add_argument("--push-s", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append the result section to this markdown file")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = [heading(), "",
           f"Stand-in engines: a chunk takes its longest completion's time, completion times log-normal (median "
           f"{args.median_s} s, sigma {args.sigma}, capped at {args.cap}x the median); stand-in trainer "
           f"{args.train_s} s per step, push {args.push_s} s; {args.prompts_per_worker} prompts per worker per step x "
           f"{args.group} samples; {args.steps} steps, the first {args.warmup} not measured. CPU: the driver process "
           "(loop, scheduler and scoring threads) per step, and as a share of wall time.", "",
           "| workers | mode | samples/s | vs sync | trainer idle | step s | driver CPU per step | driver CPU share "
           "| staleness mean |", "|---|---|---|---|---|---|---|---|---|"]
    for workers in args.workers:
        base = None
        for staleness in [None, *args.staleness]:
            r = simulate(workers, staleness, args)
            base = base or r["samples_per_s"]
            label = "sync" if staleness is None else f"async K={staleness}"
            out.append(f"| {workers} | {label} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x "
                       f"| {r['idle']:.0%} | {r['step_s']:.2f} | {r['cpu_per_step_ms']:.0f} ms | {r['cpu_share']:.1%} "
                       f"| {r['staleness']:.2f} |")
            print(out[-1], flush=True)
    ray.shutdown()
    publish(out, args.out)


if __name__ == "__main__":
    main()
