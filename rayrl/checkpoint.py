"""Atomic, rotating checkpoints: a crash mid-save leaves the previous checkpoint intact.

Layout: ``output_dir/checkpoints/step-00000050/`` holding the DeepSpeed engine state (every rank's
shard) and ``trainer_state.json`` (the driver's: step, data position, run id). A checkpoint is written
to a hidden temp directory and renamed into place only once complete; renaming is atomic on POSIX
file systems, so every ``step-*`` directory is whole.

Whole is not intact: a disk error, a copy cut short or a hand edit can damage a checkpoint later.
Each one carries ``manifest.json`` (every file's size and SHA-256); :meth:`CheckpointManager.verify`
checks it, and a resume takes the newest checkpoint that passes (:meth:`latest_intact`), saying
which ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(directory: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under ``directory``."""
    return {str(p.relative_to(directory)): [p.stat().st_size, _digest(p)]
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint a resume passed over, and why."""

    path: Path
    reason: str


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
        (tmp / MANIFEST_FILE).write_text(json.dumps({"files": _manifest(tmp)}, indent=1))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_intact(self) -> tuple[Path | None, list[SkippedCheckpoint]]:
        """The newest checkpoint that passes :meth:`verify`, and the newer ones that did not."""
        skipped = []
        for path in reversed(self.all()):
            reason = self.verify(path)
            if reason is None:
                return path, skipped
            skipped.append(SkippedCheckpoint(path, reason))
        return None, skipped

    @staticmethod
    def verify(path: Path) -> str | None:
        """None if the checkpoint at ``path`` is intact, else what is wrong with it. Checkpoints
        written before manifests existed are checked for a readable state file only."""
        try:
            CheckpointManager.load_state(path)
        except CheckpointError as error:
            return str(error)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        try:
            expected = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{manifest_path}: not a readable manifest"
        for name, (size, digest) in expected.items():
            file = path / name
            if not file.is_file():
                return f"{file}: missing"
            if file.stat().st_size != size:
                return f"{file}: {file.stat().st_size} bytes, the manifest says {size}"
            if _digest(file) != digest:
                return f"{file}: contents differ from the manifest's checksum"
        return None

    @staticmethod
    def load_state(path: Path) -> dict[str, Any]:
        """The driver's state of a checkpoint; a :class:`CheckpointError` naming the file if unreadable."""
        state_file = Path(path) / STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{state_file}: cannot be read ({type(error).__name__}: {error})") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{state_file}: has no integer 'step'")
        return state


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message names the file)."""
