"""Job submission overhead: seconds from `rayrl submit` to the first training step, and what travels.

Starts a private single-node head on loopback (token auth on, Ray's default) unless --address is
given, then for each repeat runs `rayrl submit` (a subprocess, as a user would) for a tiny SFT run
and polls the run's metrics.jsonl for the first row with "step": 1 and a loss. Reports:
  submit_s      `rayrl submit` start -> the command returned (validate, stage, upload, submit)
  first_step_s  `rayrl submit` start -> the step-1 row appeared in metrics.jsonl
  total_s       `rayrl submit` start -> the job SUCCEEDED
  staged_bytes  the staged working_dir (config + the local files it names)

  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAYRL_CACHE=/tmp/rc .venv/bin/python benchmarks/submit_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rayrl.submit import client, start_local_head  # noqa: E402

TINY = ["train.max_steps=2", "train.warmup_steps=0", "eval.at_start=false", "eval.every_steps=0",
        "eval.max_examples=8", "trainer.num_cpus=0.5", "tracking.wandb.mode=offline"]


def first_step_row(output_dir: Path) -> bool:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step") == 1 and "loss" in row:
            return True
    return False


def one_run(address: str, work: Path, env: dict[str, str], config: str, extra: list[str]) -> dict:
    out = work / f"run-{time.time_ns()}"
    cmd = [sys.executable, "-m", "rayrl.cli", "submit", config, *TINY, *extra, f"output_dir={out}",
           "--address", address, "--env", "RAYRL_CACHE"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    submitted = time.time()
    if proc.returncode:
        raise SystemExit(f"submit failed: {proc.stderr[-2000:]}")
    job_id = proc.stdout.strip().splitlines()[-1]
    staged = int(re.search(r"staged (\d+) bytes", proc.stderr).group(1))
    first = None
    jobs = client(address)
    while True:
        if first is None and first_step_row(out):
            first = time.time()
        status = str(jobs.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            if first is None and first_step_row(out):
                first = time.time()
            break
        time.sleep(0.2)
    end = time.time()
    return {"job_id": job_id, "status": status, "submit_s": round(submitted - start, 2),
            "first_step_s": round(first - start, 2) if first else None, "total_s": round(end - start, 2),
            "staged_bytes": staged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="an existing job server (default: start a local head)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default="examples/sft.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env = {**os.environ, "RAYRL_CACHE": os.environ.get("RAYRL_CACHE", "/tmp/rc")}
    env.pop("RAY_ADDRESS", None)
    head = None
    if args.address is None:
        started = time.time()
        head = start_local_head(num_cpus=2, env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        print(f"local head up in {time.time() - started:.1f}s at {head.address}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="rayrl-bench-") as work:
            for i in range(args.repeats):
                result = one_run(args.address or head.address, Path(work), env, args.config, args.overrides)
                print(json.dumps({"repeat": i, **result}), flush=True)
    finally:
        if head is not None:
            head.stop()


if __name__ == "__main__":
    main()
