"""Dispatch a validated stage config to its loop."""

from __future__ import annotations

from rayrl.config import SFTConfig


def run_stage(config):
    if isinstance(config, SFTConfig):
        from rayrl.sft import run_sft

        return run_sft(config)
    raise TypeError(f"no loop for {type(config).__name__}")
