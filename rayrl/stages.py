"""Dispatch a validated stage config to its loop."""

from __future__ import annotations

from rayrl.config import DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, SFTConfig


def run_stage(config):
    # Each loop imports torch and its actors: imported when it runs, as the CLI imports this module.
    if isinstance(config, SFTConfig):
        from rayrl.sft import run_sft  # slow: torch

        return run_sft(config)
    if isinstance(config, DPOConfig):
        from rayrl.dpo import run_dpo  # slow: torch

        return run_dpo(config)
    if isinstance(config, RewardModelConfig):
        from rayrl.rm import run_rm  # slow: torch

        return run_rm(config)
    if isinstance(config, (GRPOConfig, PPOConfig)):
        from rayrl.rl import run_rl  # slow: torch

        return run_rl(config)
    raise TypeError(f"no loop for {type(config).__name__}")
