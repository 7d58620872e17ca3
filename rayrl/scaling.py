"""Elastic rollout workers: ``rayrl scale OUTPUT_DIR rollout.num_workers=N`` asks a running RL run to
grow or shrink its rollout pool.

The request is a file in the run's output directory (``scale_request.json``, written atomically), so
it reaches a run on an embedded cluster, and a submitted Ray job too: ``rayrl submit`` already needs
``output_dir`` on storage the cluster shares. From a machine that does not see that storage,
``rayrl scale --address ADDRESS OUTPUT_DIR|JOB_ID ...`` writes it on the cluster's side, in a short job
(``rayrl.submit.request_scale_on_cluster``). The run takes the request between steps (nothing is in
flight then: a removed worker has finished its work), starts new workers with the current policy
weights before their first request, and logs ``rollout/num_workers`` every step.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from rayrl.config import ConfigError

SCALE_REQUEST_FILE = "scale_request.json"
SCALABLE_KEY = "rollout.num_workers"

_log = logging.getLogger(__name__)


def parse_scale_request(overrides: list[str]) -> int:
    """N of ``rollout.num_workers=N``, the one key a running run can change."""
    if len(overrides) != 1 or "=" not in overrides[0] or overrides[0].split("=", 1)[0].strip() != SCALABLE_KEY:
        raise ConfigError(f"scale: give exactly {SCALABLE_KEY}=N (the one key a running run can change), "
                          f"got {' '.join(overrides) or 'nothing'}")
    value = overrides[0].split("=", 1)[1].strip()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1 or str(count) != value:
        raise ConfigError(f"scale: {SCALABLE_KEY} must be a whole number >= 1, got {value!r}")
    return count


def request_scale(output_dir: str | Path, overrides: list[str]) -> int:
    """Check the request against the run's ``config.yaml`` and leave it for the run; returns N."""
    count = parse_scale_request(overrides)
    directory = Path(output_dir)
    config_path = directory / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"scale: {directory} holds no config.yaml: not the output_dir of a run")
    run = yaml.safe_load(config_path.read_text()) or {}
    if run.get("algorithm") not in ("grpo", "ppo"):
        raise ConfigError(f"scale: {config_path} is a {run.get('algorithm')!r} run; only RL runs (grpo, ppo) "
                          "have rollout workers")
    if run.get("placement") == "colocated":
        raise ConfigError(f"scale: {config_path} has placement: colocated: each rollout worker shares a "
                          "trainer rank's bundle, so their number is trainer.world_size")
    if (run.get("rollout") or {}).get("weight_transport") == "nccl":
        raise ConfigError(f"scale: {config_path} uses rollout.weight_transport: nccl, whose broadcast group "
                          "cannot take new workers yet")
    tmp = directory / (SCALE_REQUEST_FILE + ".tmp")
    tmp.write_text(json.dumps({SCALABLE_KEY: count}))
    os.replace(tmp, directory / SCALE_REQUEST_FILE)
    return count


def take_scale_request(output_dir: str | Path) -> int | None:
    """The rollout pool size a ``rayrl scale`` asked for since the last call (the request is consumed),
    or None."""
    path = Path(output_dir) / SCALE_REQUEST_FILE
    taken = path.with_name(SCALE_REQUEST_FILE + ".taken")
    try:
        os.replace(path, taken)  # claimed whole: a request written meanwhile waits for the next step
    except FileNotFoundError:
        return None
    text = taken.read_text()
    taken.unlink(missing_ok=True)
    try:
        count = json.loads(text)[SCALABLE_KEY]
        if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
            return count
    except (ValueError, KeyError, TypeError):
        pass
    _log.warning("ignoring %s: expected {%r: N >= 1}, got %r", path, SCALABLE_KEY, text[:200])
    return None
