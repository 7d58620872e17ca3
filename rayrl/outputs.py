"""What a run writes into its output_dir: the resolved config and the final Hugging Face model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from pydantic import BaseModel

FINAL_MODEL_DIR = "final"


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
