"""Atomic, rotating checkpoints: a crash mid-save leaves the previous checkpoint intact.

Layout: ``output_dir/checkpoints/step-00000050/`` holding the DeepSpeed engine state (every rank's
shard) and ``trainer_state.json`` (the driver's: step, data position, run id). A checkpoint is written
to a hidden temp directory and renamed into place only once complete; renaming is atomic on POSIX
file systems, so every ``step-*`` directory is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "trainer_state.json"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, write_engine: Callable[[Path], None], state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_engine(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load_state(path: Path) -> dict[str, Any]:
        return json.loads((path / STATE_FILE).read_text())
