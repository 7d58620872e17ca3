"""Dispatch a validated stage config to its loop."""

from __future__ import annotations

from rayrl.config import DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, SFTConfig


def run_stage(config):
    if isinstance(config, SFTConfig):
        from rayrl.sft import run_sft

        return run_sft(config)
    if isinstance(config, DPOConfig):
        from rayrl.dpo import run_dpo

        return run_dpo(config)
    if isinstance(config, RewardModelConfig):
        from rayrl.rm import run_rm

        return run_rm(config)
    if isinstance(config, GRPOConfig):
        from rayrl.rl import run_grpo

        return run_grpo(config)
    if isinstance(config, PPOConfig):
        from rayrl.rl import run_ppo

        return run_ppo(config)
    raise TypeError(f"no loop for {type(config).__name__}")
