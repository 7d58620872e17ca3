"""What each isolation level of the code sandbox costs per child: the median wall time of a one-test run
(``def add`` + one assert), ``guard`` (the Python-level guard in a subprocess) against ``strict`` (the
same inside bubblewrap: namespaces, read-only view, seccomp; as root, two bwrap steps and a uid drop).

Run:  python benchmarks/sandbox_overhead.py [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

from rayrl.rewards.code_sandbox import run_python_sandboxed

CODE = "def add(a, b):\n    return a + b\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print("| isolation | median per child (ms) | p90 (ms) |\n|---|---|---|")
    for mode in ("guard", "strict"):
        run_python_sandboxed(CODE, ["add(1, 2) == 3"], isolation=mode)  # warm: the strict probe runs once
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            result = run_python_sandboxed(CODE, ["add(1, 2) == 3"], isolation=mode)
            times.append(1000 * (time.perf_counter() - start))
            assert result.passed == 1, result
        times.sort()
        print(f"| {mode} | {statistics.median(times):.0f} | {times[int(0.9 * (len(times) - 1))]:.0f} |")


if __name__ == "__main__":
    main()
