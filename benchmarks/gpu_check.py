"""GPU check: the DeepSpeed policy-trainer step on CUDA and the CUDA IPC weight transfer, on one GPU.

What it runs (no Ray, no vLLM needed: the roles are plain classes, driven here directly):
1. ``PolicyTrainer`` (DeepSpeed, bf16, ZeRO-0, NCCL backend with one rank) on a Qwen2.5-0.5B-shaped
   model with random weights: SFT optimizer steps on B x T random tokens -> tokens/s, model TFLOP/s
   (6 x params x tokens), peak GPU memory.
2. The colocated weight sync: the trainer packs its weights into CUDA buffers and shares IPC handles
   (``PolicyTrainer.share_weights_ipc``); a second process holding a ``RolloutWorker`` (HF backend on
   the same GPU, the engine-side loader of rayrl) opens them and loads the weights
   (``update_weights_ipc``). Seconds and GB/s per push, against a plain device-to-device copy and a
   device -> host -> device round trip of the same bytes (what a host-memory transport costs at
   least). Correctness: per-tensor checksums of the receiver's weights equal the trainer's (bf16)
   after the push and differ before it; log-probs of a fixed sequence from both sides.
NCCL broadcast (split layouts) needs two GPUs (NCCL refuses two ranks on one device): not run here.

Run:  python benchmarks/gpu_check.py [--out DIR] [--steps 10] [--batch 8] [--seq 1024]
      python benchmarks/gpu_check.py --cpu-smoke   # part 1 only, tiny model, gloo: keeps the script honest in CI
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def import_rayrl() -> None:
    """Make ``rayrl.actors`` importable from a plain checkout (pyproject maps it to ``actors/``)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import rayrl

    try:
        import rayrl.actors  # noqa: F401  (installed package)
    except ImportError:
        spec = importlib.util.spec_from_file_location("rayrl.actors", ROOT / "actors" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "actors")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rayrl.actors"] = module
        spec.loader.exec_module(module)
        rayrl.actors = module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checksums(state: dict) -> dict[str, float]:
    import torch

    return {name: float(t.detach().to(torch.bfloat16).double().sum()) for name, t in state.items()}


def receiver(model_path: str, requests, responses) -> None:
    """The rollout side, in its own process (as a Ray actor would be)."""
    import_rayrl()
    import torch

    from rayrl.actors.rollout_worker import RolloutWorker

    try:
        worker = RolloutWorker(model_path, backend="hf", dtype="bfloat16", seed=0)
        responses.put(("ready", None))
        while True:
            kind, payload = requests.get()
            if kind == "stop":
                return
            if kind == "sums":
                responses.put(("sums", checksums(worker.engine.model.state_dict())))
            elif kind == "push":
                version, shared = payload
                stats = worker.update_weights_ipc(version, shared)
                responses.put(("pushed", stats.seconds))
            elif kind == "logprobs":
                ids, plen = payload
                responses.put(("logprobs", worker.sequence_logprobs([ids], [plen])[0]))
            torch.cuda.synchronize()
    except Exception:
        responses.put(("error", traceback.format_exc()))


def expect(responses, kind: str, timeout: float = 600):
    got, payload = responses.get(timeout=timeout)
    if got == "error":
        raise RuntimeError(f"receiver failed:\n{payload}")
    if got != kind:
        raise RuntimeError(f"receiver answered {got!r}, expected {kind!r}")
    return payload


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--cpu-smoke", action="store_true", help="trainer step only, tiny model, on CPU")
    args = parser.parse_args()
    import_rayrl()
    import torch
    import torch.multiprocessing as mp

    from rayrl.actors.engine import TrainerSpec
    from rayrl.actors.policy_trainer import PolicyTrainer
    from rayrl.data.batch import TokenBatch
    from weight_sync import QWEN_05B, build_model

    on_gpu = not args.cpu_smoke
    if not on_gpu:
        args.batch, args.seq, args.steps = 2, 32, 2
    report: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke)", "torch": torch.__version__}
    print(json.dumps(report), flush=True)
    cache = Path(tempfile.mkdtemp(prefix="rayrl-gpu-"))
    t = time.perf_counter()
    model_path = build_model("qwen0.5b" if on_gpu else "tiny", "bfloat16", cache)
    vocab = QWEN_05B["vocab_size"] if on_gpu else 64
    report["model"] = {"shape": "Qwen2.5-0.5B (random weights)" if on_gpu else "tiny",
                       "build_s": round(time.perf_counter() - t, 1)}

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:  # the receiver loads its (initial) copy while the trainer sets up
        ctx = mp.get_context("spawn")
        requests, responses = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=receiver, args=(str(model_path), requests, responses), daemon=True)
        child.start()

    # 1. Trainer step.
    spec = TrainerSpec(model_path=str(model_path), world_size=1, micro_batch_size=args.batch, grad_accum_steps=1,
                       total_steps=args.steps + 2, lr=1e-4, dtype="bfloat16", zero_stage=0,
                       num_threads=8 if on_gpu else 1,
                       warmup_steps=0, lr_schedule="constant")
    trainer = PolicyTrainer(spec, rank=0)
    t = time.perf_counter()
    info = trainer.setup("127.0.0.1", free_port(), 0, 1)
    report["trainer_setup_s"] = round(time.perf_counter() - t, 1)
    params = info["parameters"]
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand(args.batch, -1).contiguous()
    batch = TokenBatch(input_ids=ids, loss_mask=torch.ones_like(ids, dtype=torch.bool), position_ids=positions,
                       segment_ids=torch.ones_like(ids))
    losses = []
    for _ in range(2):  # warm-up
        losses.append(trainer.train_sft_step([batch], batch.num_loss_tokens)["loss"])
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        losses.append(trainer.train_sft_step([batch], batch.num_loss_tokens)["loss"])
    sync()
    step_s = (time.perf_counter() - t) / args.steps
    tokens = args.batch * args.seq
    report["trainer_step"] = {
        "parameters": params, "batch": args.batch, "seq": args.seq, "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s), "model_tflops": round(6 * params * tokens / step_s / 1e12, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}
    print(json.dumps({"trainer_step": report["trainer_step"]}), flush=True)
    if not on_gpu:
        trainer.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
        return

    # 2. CUDA IPC push into the receiver process.
    expect(responses, "ready")
    trainer_sums = checksums(trainer.train_engine.module.state_dict())
    requests.put(("sums", None))
    before = expect(responses, "sums")
    common = sorted(set(trainer_sums) & set(before))
    pushes = []
    for version in range(1, args.pushes + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        shared = trainer.share_weights_ipc(args.bucket_mb << 20, "bfloat16")
        t1 = time.perf_counter()
        requests.put(("push", (version, shared)))
        load_s = expect(responses, "pushed")
        t2 = time.perf_counter()
        trainer.release_shared_weights()
        nbytes = sum(b["layout"].nbytes for b in shared)
        pushes.append({"version": version, "pack_share_s": round(t1 - t0, 4), "receiver_load_s": round(load_s, 4),
                       "total_s": round(t2 - t0, 4), "bytes": nbytes, "buckets": len(shared),
                       "gb_per_s": round(gbps(nbytes, t2 - t0), 2)})
    requests.put(("sums", None))
    after = expect(responses, "sums")
    seq = ids[0, :64].tolist()
    requests.put(("logprobs", (seq, 8)))
    engine_lp = torch.tensor(expect(responses, "logprobs"))
    trainer_lp = trainer.token_logprobs(TokenBatch(
        input_ids=torch.tensor([seq]), loss_mask=torch.ones(1, 64, dtype=torch.bool),
        position_ids=torch.arange(64)[None], segment_ids=torch.ones(1, 64, dtype=torch.long)))[0, 7:].float()
    report["ipc_push"] = {
        "pushes": pushes,
        "tensors_compared": len(common),
        "checksums_differ_before": sum(trainer_sums[n] != before[n] for n in common),
        "checksums_differ_after": sum(trainer_sums[n] != after[n] for n in common),
        "max_abs_logprob_diff_engine_vs_trainer": round(float((engine_lp - trainer_lp).abs().max()), 5)}
    print(json.dumps({"ipc_push": report["ipc_push"]}), flush=True)
    requests.put(("stop", None))
    child.join(timeout=60)

    # Baselines on the same bytes.
    nbytes = pushes[-1]["bytes"]
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    d2d = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    host = src.cpu()
    back = host.cuda()
    torch.cuda.synchronize()
    hop = time.perf_counter() - t
    del back
    report["baselines"] = {"bytes": nbytes, "d2d_copy_s": round(d2d, 5), "d2d_gb_per_s": round(gbps(nbytes, d2d), 1),
                           "device_host_device_s": round(hop, 4), "device_host_device_gb_per_s": round(gbps(nbytes, hop), 2)}
    report["nccl_broadcast"] = "not run: needs two GPUs (NCCL refuses two ranks on one device)"
    print(json.dumps({"baselines": report["baselines"]}), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
