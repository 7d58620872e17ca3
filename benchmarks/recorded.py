"""What every benchmark script does with its figures: a heading that names the command, then print the
section and append it to the results file named by ``--out`` (``benchmarks/results/*.md``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def heading() -> str:
    """``## DATE: `python benchmarks/SCRIPT ARGS` `` for the running script."""
    return f"## {time.strftime('%Y-%m-%d')}: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`"


def publish(lines: list[str], out: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")
