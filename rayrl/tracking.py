"""Run tracking: ``metrics.jsonl``, a console progress bar with ETA, and Weights & Biases.

The same metric names go to all three. ``metrics.jsonl`` holds one JSON object per optimizer step
(``step`` plus the stage's metrics) and eval entries (``step`` plus ``eval/...`` keys). RL stages can
also log tables of sampled completions (``tracking.sample_table_every``): a W&B table ``samples`` and
the same rows in ``samples.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from rayrl.checkpoint import CheckpointManager
from rayrl.data.loading import DataError

from rayrl.config import WandbConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
WANDB_ID_FILE = "wandb_run_id"
SAMPLE_TABLE_KEY = "samples"
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not measured"
    return value


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    return read_records(Path(output_dir) / METRICS_FILE)


def read_samples(output_dir: str | Path) -> list[dict[str, Any]]:
    return read_records(Path(output_dir) / SAMPLES_FILE)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` record file ([] if there is none). A last line without its
    newline (a run killed mid-write) is left out; any other bad line is a :class:`DataError` naming
    the file and line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines) and not raw.endswith(b"\n"):
                break  # cut short by a crash
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else f"not a JSON object ({error})"
            raise DataError(f"{path}:{number}: {reason}") from None
        rows.append(row)
    return rows


def truncate_metrics(output_dir: str | Path, last_step: int) -> None:
    """Drop entries (metrics and sample rows) after ``last_step`` so a resumed run does not log steps twice."""
    for name, rows in ((METRICS_FILE, read_metrics(output_dir)), (SAMPLES_FILE, read_samples(output_dir))):
        path = Path(output_dir) / name
        if not path.exists():
            continue
        kept = [row for row in rows if row.get("step", 0) <= last_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, path)


def sample_table_due(every: int, step: int) -> bool:
    """Whether rollout step ``step`` (1-based) logs a sample table (``tracking.sample_table_every``)."""
    return every > 0 and step % every == 0


def sample_rows(step: int, prompts: list[str], completions: list[str], rewards: list[float], *,
                group_size: int, limit: int, per_function: dict[str, list[float]] | None = None,
                extra: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """Up to ``limit`` rows of one step's samples for a sample table. Items are grouped by prompt
    (``group_size`` consecutive completions per prompt); rows go round-robin over the groups (sample 0
    of every prompt, then sample 1, ...) so a small table still shows many prompts.

    Columns: ``step``, ``prompt``, ``completion``, ``reward`` (the weighted total), then
    ``reward/<name>`` per reward function and any ``extra`` columns (e.g. ``policy_version``)."""
    n = len(completions)
    if not (len(prompts) == len(rewards) == n):
        raise ValueError(f"sample_rows: {len(prompts)} prompts, {n} completions and {len(rewards)} rewards differ")
    group_size = max(1, group_size)
    groups = -(-n // group_size)
    order = [g * group_size + s for s in range(group_size) for g in range(groups) if g * group_size + s < n]
    rows = []
    for i in order[:limit]:
        row: dict[str, Any] = {"step": step, "prompt": prompts[i], "completion": completions[i],
                               "reward": _clean(float(rewards[i]))}
        for name, values in (per_function or {}).items():
            row[f"reward/{name}"] = _clean(float(values[i]))
        for name, values in (extra or {}).items():
            row[name] = values[i]
        rows.append(row)
    return rows


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    def __init__(self, output_dir: str | Path, *, config: dict[str, Any], wandb: WandbConfig,
                 total_steps: int, start_step: int = 0, progress: bool = True, description: str = "train"):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file: Any = None  # opened at the first row: a resumed run cuts the file after its checkpoint loads
        self._bar = None
        if progress:
            from tqdm import tqdm  # slow: tqdm, ~60 ms (the CLI imports this module); only for a progress bar

            self._bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step",
                             file=sys.stderr, dynamic_ncols=True)
        self._wandb = None
        mode = resolve_wandb_mode(wandb.mode)
        if mode != "disabled":
            self._wandb = self._start_wandb(wandb, mode, config)

    def _start_wandb(self, settings: WandbConfig, mode: str, config: dict[str, Any]):
        import wandb  # slow: wandb; only when W&B logging is on

        id_file = self.output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(project=settings.project, name=settings.run_name, tags=settings.tags or None,
                          config=config, dir=str(self.output_dir), mode=mode, id=run_id, resume="allow",
                          settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self._file is None:
            self._file = (self.output_dir / METRICS_FILE).open("a")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        if self._bar is not None:
            shown = {k: row[k] for k in ("loss", "eval/loss", "eval/accuracy", "tokens_per_s") if row.get(k) is not None}
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def rewind(self, step: int) -> None:
        """Continue after ``step``: drop the rows logged after it (a run that went back to its
        checkpoint of ``step`` logs those steps again). W&B keeps what it has: it ignores rows of a
        step it has seen until the run passes it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        truncate_metrics(self.output_dir, step)
        if self._bar is not None:
            self._bar.reset(total=self._bar.total)
            self._bar.update(step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of sampled completions: appended to ``samples.jsonl`` (one JSON object per row) and
        logged to W&B as the table ``samples`` at ``step``."""
        if not rows:
            return
        with (self.output_dir / SAMPLES_FILE).open("a") as f:
            f.write("".join(json.dumps({**row, "step": step}) + "\n" for row in rows))
        if self._wandb is not None:
            self._wandb.log({SAMPLE_TABLE_KEY: build_wandb_table(step, rows)}, step=step)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def build_wandb_table(step: int, rows: list[dict[str, Any]]):
    """A ``wandb.Table`` of sample rows; columns are the fixed ones, then every other key in first-seen order."""
    import wandb  # slow: wandb; only when W&B logging is on

    columns = list(SAMPLE_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    data = [[step if column == "step" else row.get(column) for column in columns] for row in rows]
    return wandb.Table(columns=columns, data=data)


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm became inf or NaN: the run stops before it saves or exports anything."""


# The training metrics that must stay finite (a policy/critic step's loss and gradient norm).
FINITE_METRICS = ("loss", "grad_norm", "critic/value_loss", "critic/grad_norm")


def check_finite_training(step: int, metrics: dict[str, float], checkpoints: CheckpointManager) -> None:
    """Stop the run at the first optimizer step whose loss or gradient norm is not finite, naming the
    step and keeping the last checkpoint (nothing after it is saved or exported)."""
    for key in FINITE_METRICS:
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            last = checkpoints.latest()
            kept = f"the last checkpoint, {last}, is kept" if last else "no checkpoint was saved before it"
            raise TrainingDiverged(f"step {step}: {key} is {value}: training diverged, the run stops; {kept}. "
                                   "Lower train.lr, or check the data")
