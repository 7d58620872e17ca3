"""Weight-sync cost: trainer -> running vLLM-CPU rollout worker through Ray, against a plain memcpy.

For each model (the tiny Llama, and a Qwen2.5-0.5B-shaped Qwen2 with random weights: hidden 896,
24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936, tied embeddings):

  memcpy warm     ``dst.copy_(src)`` of every tensor into preallocated buffers (the floor)
  clone cold      ``src.clone()`` of every tensor (allocation + first touch, like a fresh receive buffer)
  bucket          ``bucket_state_dict`` (zero-copy numpy views; bf16 as tagged int16)
  push            ``push_to_workers``: ray.put of each bucket once, the actor's ray.get (zero-copy from
                  the object store), layerwise reload into the engine, prefix-cache reset; the first
                  push is reported apart (cold object store pages, first reload)

The rollout worker is a Ray actor holding an in-process vLLM-CPU engine (``RolloutWorker``). After the
pushes the engine's log-probs of a fixed sequence are compared with HF's on the pushed weights (the
trainer copy is scaled by 1.05 first, so before the push they differ); "fresh engine" is the same
comparison on the checkpoint weights before any push: the kernels' own numerical floor (bf16 is far
from exact; fp32 shows whether the push is).

Run:  python benchmarks/weight_sync.py [--models tiny,qwen0.5b] [--pushes 4] [--dtype bfloat16]
The Qwen-shaped checkpoint (~1 GB in bf16) is built once under --cache (default /tmp/rayrl-bench).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0)


def build_model(name: str, dtype: str, cache: Path) -> Path:
    """A local HF checkpoint (weights + the tiny char tokenizer), built once."""
    import torch

    from rayrl.tiny import build_tokenizer, init_model

    target = cache / f"{name}-{dtype}"
    if (target / "config.json").exists():
        return target
    if name == "tiny":
        init_model(target)
        return target
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(**QWEN_05B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, torch_dtype=dtype)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))  # build directly in the target dtype (RAM)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_model(ray, name: str, dtype: str, cache: Path, pushes: int, bucket_mb: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from rayrl.actors.rollout_worker import RolloutWorker
    from rayrl.weight_sync import bucket_state_dict, push_to_workers

    path = build_model(name, dtype, cache)
    start = time.perf_counter()
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(str(path), backend="vllm", dtype=dtype, seed=0,
                                                          kv_cache_gib=0.5, max_model_len=512)
    ray.get(worker.policy_version.remote())
    init_s = time.perf_counter() - start

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    seq = list(range(2, 66))

    def hf_logprobs():
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1).numpy()

    engine_logprobs = lambda: np.array(ray.get(worker.sequence_logprobs.remote([seq], [1]))[0])
    # The kernel-numerics floor: the engine's checkpoint weights against HF's, no push involved.
    diff_fresh = float(np.abs(engine_logprobs() - hf_logprobs()).max())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)  # so that a push that did not land would show
    named = list(model.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for _, p in named)

    dst = [torch.empty_like(p) for _, p in named]
    for d, (_, p) in zip(dst, named):
        d.copy_(p)  # first touch of dst
    warm = timed(lambda: [d.copy_(p) for d, (_, p) in zip(dst, named)], 5)
    del dst
    cold = timed(lambda: [p.detach().clone() for _, p in named], 3)

    bucket_s = timed(lambda: bucket_state_dict(named, bucket_bytes=bucket_mb << 20), 3)
    buckets = bucket_state_dict(named, bucket_bytes=bucket_mb << 20)

    ref = hf_logprobs()
    before = engine_logprobs()

    results = []
    for version in range(1, pushes + 1):
        results.append(push_to_workers([worker], version, buckets))
    after = engine_logprobs()
    ray.get(worker.shutdown.remote())
    ray.kill(worker)

    warm_pushes = results[1:] or results
    med = lambda xs: statistics.median(xs)
    return {
        "name": name, "dtype": dtype, "bytes": nbytes, "tensors": len(named), "buckets": len(buckets),
        "init_s": init_s, "memcpy_warm": med(warm), "clone_cold": med(cold), "bucket_s": med(bucket_s),
        "push_first": results[0].seconds,
        "push_warm": med([r.seconds for r in warm_pushes]),
        "push_warm_all": [round(r.seconds, 4) for r in warm_pushes],
        "put_warm": med([r.put_seconds for r in warm_pushes]),
        "fetch_warm": med([r.worker_stats[0].fetch_seconds for r in warm_pushes]),
        "load_warm": med([r.worker_stats[0].load_seconds for r in warm_pushes]),
        "diff_fresh": diff_fresh, "diff_before": float(np.abs(before - ref).max()),
        "diff_after": float(np.abs(after - ref).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,qwen0.5b")
    parser.add_argument("--pushes", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rayrl-bench"))
    args = parser.parse_args()

    import ray

    env = {k: os.environ[k] for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    rows = []
    try:
        for name in args.models.split(","):
            rows.append(bench_model(ray, name, args.dtype, args.cache, args.pushes, args.bucket_mb))
    finally:
        ray.shutdown()

    print(f"weights {args.dtype}, {args.bucket_mb} MiB buckets, {args.pushes} pushes (warm = median of pushes 2..), "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    print("| model | MB | tensors / buckets | memcpy warm s | clone cold s | bucket s | push first s "
          "| push warm s (put + fetch + load) | push warm GB/s | memcpy GB/s "
          "| max abs dlogprob: fresh engine / before push / after push |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gb = r["bytes"] / 1e9
        print(f"| {r['name']} | {r['bytes'] / 1e6:,.1f} | {r['tensors']} / {r['buckets']} | {r['memcpy_warm']:.4f} | "
              f"{r['clone_cold']:.4f} | {r['bucket_s']:.4f} | {r['push_first']:.3f} | {r['push_warm']:.3f} "
              f"({r['put_warm']:.3f} + {r['fetch_warm']:.4f} + {r['load_warm']:.3f}) | {gb / r['push_warm']:.2f} | "
              f"{gb / r['memcpy_warm']:.2f} | {r['diff_fresh']:.3g} / {r['diff_before']:.3g} / {r['diff_after']:.3g} |")
    for r in rows:
        print(f"\n{r['name']}: engine init (Ray actor, in-process vLLM) {r['init_s']:.1f} s; "
              f"warm pushes {r['push_warm_all']}")


if __name__ == "__main__":
    main()
