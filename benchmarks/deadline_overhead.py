"""What the deadlines cost: every remote call of the RL loop goes through a deadline (``rayrl.remote.gather``
for the calls on all of a role's actors, ``rayrl.recovery.CallStream`` for the rollout and scoring
calls), where a plain loop would ``ray.get`` its refs and wait forever.

1. Per call, side by side in one process on the same actors (blocks interleaved, so drift hits both):
   ``ray.get(refs)`` vs ``gather(refs, deadline_s=...)`` for a call on 2 actors (two trainer ranks),
   and ``ray.get`` of one call per actor vs ``RestartingActors.map`` (``CallStream``, the pool's
   deadline-and-reissue path) over 16 calls on 2 actors.
2. In proportion: a GRPO run of the built-in tiny model (``examples/grpo.yaml``, in this process) counts
   its deadline-bounded waits per step (``gather`` and ``CallStream.wait`` calls) and its step time; the
   cost per step is the count times the extra cost per wait measured in 1.

Run:  python benchmarks/deadline_overhead.py [--rounds 2000] [--steps 8] [--out benchmarks/results/deadline_overhead.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from recorded import heading, publish  # benchmarks/recorded.py

REPO = Path(__file__).resolve().parents[1]
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Echo:
    def echo(self, value: int) -> int:
        return value


def per_call_us(rounds: int, block: int = 100) -> dict[str, float]:
    """Microseconds per round of each way of waiting, blocks of ``block`` rounds interleaved."""
    import ray

    from rayrl.recovery import Call, RestartingActors
    from rayrl.remote import ActorIdentity, gather

    actors = [ray.remote(num_cpus=0)(Echo).remote() for _ in range(2)]
    ray.get([a.echo.remote(0) for a in actors], timeout=120)
    who = [ActorIdentity("bench", i) for i in range(2)]
    pool = RestartingActors("bench", lambda i: actors[i], 0, max_restarts=0, startup_s=60, setting="bench")
    pool.actors.extend(actors)
    pool.who.extend(who)
    calls = [Call(lambda actor, k=k: actor.echo.remote(k), 60.0, "echoing") for k in range(16)]

    # The baselines wait without a deadline on purpose: they are what the deadlines are measured against.
    def plain_pair():
        ray.get([a.echo.remote(1) for a in actors])

    def gather_pair():
        gather([a.echo.remote(1) for a in actors], who=who, doing="echoing", deadline_s=60.0, setting="bench")

    def plain_stream():  # what the pool does without deadlines: one call in flight per actor
        for k in range(0, 16, 2):
            ray.get([actors[0].echo.remote(k), actors[1].echo.remote(k + 1)])

    def pool_stream():
        pool.map(calls)

    ways = {"ray.get, 2 actors": plain_pair, "gather, 2 actors": gather_pair,
            "ray.get, 16 calls on 2 actors": plain_stream, "CallStream, 16 calls on 2 actors": pool_stream}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(max(1, rounds // block)):
        for name, way in ways.items():
            start = time.perf_counter()
            for _ in range(block):
                way()
            times[name].append((time.perf_counter() - start) / block * 1e6)
    for actor in actors:
        ray.kill(actor)
    return {name: statistics.median(samples) for name, samples in times.items()}


def waits_per_step(steps: int) -> tuple[float, float]:
    """(deadline-bounded waits per step, median step seconds) of a tiny GRPO run in this process."""
    import rayrl.recovery as recovery
    import rayrl.remote as remote
    from rayrl.config import load_config
    from rayrl.rl import run_rl
    from rayrl.tracking import read_metrics

    counted = {"waits": 0}
    original_gather, original_wait = remote.gather, recovery.CallStream.wait

    def counting_gather(*args, **kwargs):
        counted["waits"] += 1
        return original_gather(*args, **kwargs)

    def counting_wait(self, *args, **kwargs):
        counted["waits"] += 1
        return original_wait(self, *args, **kwargs)

    # every module that imported gather by name gets the counting one
    patched = [m for m in list(sys.modules.values())
               if m is not None and getattr(m, "__name__", "").startswith("rayrl") and getattr(m, "gather", None) is original_gather]
    for module in patched:
        module.gather = counting_gather
    recovery.CallStream.wait = counting_wait
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(str(REPO / "examples" / "grpo.yaml"), [
                f"output_dir={tmp}/grpo", f"train.max_steps={steps}", "eval.at_start=false", "eval.every_steps=0",
                "checkpoint.every_steps=0", "tracking.progress=false", "tracking.wandb.mode=disabled",
                "tracking.sample_table_every=0"])
            output_dir = run_rl(config).output_dir
            rows = [r for r in read_metrics(output_dir) if "loss" in r]
    finally:
        for module in patched:
            module.gather = original_gather
        recovery.CallStream.wait = original_wait
    # the first step compiles and starts up; the waits of set-up and shutdown are counted with the steps
    return counted["waits"] / len(rows), statistics.median(r["time/step"] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=None, help="append the result section to this markdown file")
    args = parser.parse_args()

    import ray

    os.environ.update(ENV)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": ENV})
    try:
        us = per_call_us(args.rounds)
        waits, step_s = waits_per_step(args.steps)
    finally:
        ray.shutdown()
    pair = us["gather, 2 actors"] - us["ray.get, 2 actors"]
    stream = (us["CallStream, 16 calls on 2 actors"] - us["ray.get, 16 calls on 2 actors"]) / 16
    worst = max(pair, stream, 0.0)
    out = [heading(), "",
           "Median microseconds per round (blocks of 100 rounds, the ways interleaved; 2 no-op actors):", "",
           "| way of waiting | us per round |", "|---|---|"]
    out += [f"| {name} | {value:.0f} |" for name, value in us.items()]
    out += ["", f"- Extra per wait with a deadline: gather {pair:+.0f} us per 2-actor call; CallStream "
            f"{stream:+.0f} us per call.",
            f"- The tiny GRPO run (`examples/grpo.yaml`, {args.steps} steps): {waits:.0f} deadline-bounded waits per step "
            f"(set-up included), median step {step_s * 1000:.0f} ms: at most {waits * worst / 1000:.2f} ms per step, "
            f"{100 * waits * worst / 1e6 / step_s:.2f}% of the step.", ""]
    publish(out, args.out)


if __name__ == "__main__":
    main()
