"""What a run writes into its output_dir: the resolved config and the final Hugging Face model."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from rayrl.scaling import SCALE_REQUEST_FILE

FINAL_MODEL_DIR = "final"
STAGE_DONE_MARKER = "stage_complete.json"  # written by a pipeline when the stage finished


# What one run writes into its output_dir; a fresh run moves an earlier run's copies aside.
RUN_RECORDS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "placement.json", "wandb_run_id", "checkpoints",
               FINAL_MODEL_DIR, "final_critic", STAGE_DONE_MARKER, SCALE_REQUEST_FILE)
EARLIER_RUNS_DIR = "earlier_runs"


def archive_earlier_run(output_dir: Path) -> Path | None:
    """Move an earlier run's records out of the way of a fresh run into the same ``output_dir``
    (into ``earlier_runs/<UTC time>/``), so that the two neither mix nor overwrite each other.
    Returns where they went, or None if there was nothing to move."""
    present = [name for name in RUN_RECORDS if (output_dir / name).exists() and name != "config.yaml"]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = output_dir / EARLIER_RUNS_DIR / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = output_dir / EARLIER_RUNS_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in RUN_RECORDS:
        if (output_dir / name).exists():
            os.replace(output_dir / name, target / name)
    return target


def prepare_output_dir(config: BaseModel) -> Path:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return output_dir


def export_final_model(trainers, tokenizer, output_dir: Path, name: str = FINAL_MODEL_DIR) -> Path:
    """Weights (safetensors) + config + tokenizer in ``output_dir/name``, loadable by
    ``from_pretrained`` (and, for a policy, by vLLM).

    Written to a temp directory and renamed, so the directory is never half-written.
    """
    final = Path(output_dir) / name
    tmp = Path(output_dir) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainers.export_hf(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
