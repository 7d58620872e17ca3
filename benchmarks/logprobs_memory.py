"""Extra memory and time of ``token_logprobs`` vs. naive ``log_softmax(...).gather(...)``.

Setting: float32 logits of shape (batch, seq, vocab) already materialised (default 1 x 4096 x
150k = 2.46 GB); only the memory each method allocates on top of them is counted. Each method
runs in its own subprocess; the peak is the kernel's resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs just before the measured call) minus the resident set right
before it. On CPU, PyTorch hands big blocks straight to mmap/munmap, so RSS follows tensor
allocations closely. Phases:

- fwd (no grad): log-probs for old/reference policies, inside ``torch.no_grad()``.
- fwd+bwd: ``(logp * w).sum().backward()``; includes ``logits.grad`` (one logits-sized tensor,
  2.46 GB by default), which every method must produce.

Usage:  .venv/bin/python benchmarks/logprobs_memory.py [--vocab 150000 --seq 4096 --batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

VARIANTS = {
    # name: (method, temperature, chunk_size)
    "naive log_softmax+gather": ("naive", 1.0, None),
    "token_logprobs chunk=1024": ("ours", 1.0, 1024),
    "token_logprobs chunk=256": ("ours", 1.0, 256),
    "naive, temperature 0.7": ("naive", 0.7, None),
    "token_logprobs chunk=1024, temperature 0.7": ("ours", 0.7, 1024),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _measure(fn):
    """Run fn once; return (seconds, peak extra MB over the RSS before the call)."""
    _reset_peak()
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (_status_kb("VmHWM") - before) / 1024


def worker(name: str, batch: int, seq: int, vocab: int, repeats: int) -> dict:
    import torch

    from rayrl.algorithms import token_logprobs

    method, temperature, chunk = VARIANTS[name]

    def logprobs(logits, tokens):
        if method == "ours":
            return token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk)
        x = logits.float() if temperature == 1.0 else logits.float() / temperature
        return torch.log_softmax(x, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    # Warm up kernels and thread pools on a small input so one-off allocations are not counted.
    small = torch.randn(1, 64, 1000, requires_grad=True)
    logprobs(small, torch.randint(0, 1000, (1, 64))).sum().backward()

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, seq, vocab, generator=g)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    w = torch.randn(batch, seq, generator=g)
    out = {"name": name}

    def fwd():
        with torch.no_grad():
            logprobs(logits, tokens)

    def fwd_bwd():
        logits.grad = None
        (logprobs(logits, tokens) * w).sum().backward()

    results = [_measure(fwd) for _ in range(repeats)]
    out["fwd_s"], out["fwd_mb"] = min(r[0] for r in results), max(r[1] for r in results)
    logits.requires_grad_(True)
    results = []
    for _ in range(repeats):
        logits.grad = None  # free the previous gradient before the measured call
        results.append(_measure(fwd_bwd))
    out["fwd_bwd_s"], out["fwd_bwd_mb"] = min(r[0] for r in results), max(r[1] for r in results)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=150_000)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="time = min over repeats, memory = max")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.vocab, args.repeats)))
        return

    import torch

    logits_gb = args.batch * args.seq * args.vocab * 4 / 1e9
    print(f"logits: float32 ({args.batch}, {args.seq}, {args.vocab}) = {logits_gb:.2f} GB, already materialised")
    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; repeats={args.repeats}")
    print("extra memory = peak RSS during the call minus RSS before it (fwd+bwd includes logits.grad)")
    print()
    header = "| method | fwd (no grad) extra MB | fwd time s | fwd+bwd extra MB | fwd+bwd time s |"
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--vocab", str(args.vocab),
               "--seq", str(args.seq), "--batch", str(args.batch), "--repeats", str(args.repeats)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['fwd_mb']:,.0f} | {r['fwd_s']:.2f} | {r['fwd_bwd_mb']:,.0f} | {r['fwd_bwd_s']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
