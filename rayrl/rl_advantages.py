"""Advantage estimators: phase 4 of the RL loop, one object per algorithm family behind one interface.

- ``GroupAdvantages`` (GRPO family): per-sequence advantages from each prompt's group of samples
  (group-normalised, leave-one-out, or REINFORCE++'s whitened token returns). No critic.
- ``GAEAdvantages`` (PPO): the critic's values, KL-penalised per-token rewards and GAE; it owns the
  (optionally adaptive) KL coefficient, hands the critic its value targets and checkpoints the
  coefficient with the run.

The numerics are the pure functions of ``rayrl.algorithms``; this module only decides which to call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from rayrl.algorithms import group_advantages, reinforce_pp_advantages, rloo_advantages
from rayrl.algorithms.ppo import AdaptiveKLController, gae_advantages, kl_penalized_rewards
from rayrl.config import GRPOConfig, PPOConfig, PPOSettings
from rayrl.data.batch import TokenBatch
from rayrl.data.rollout import ValueBatch
from rayrl.objectives import PolicyGradientObjective
from rayrl.trainer_group import CriticGroup


@dataclass(frozen=True)
class CriticUpdate:
    """PPO: the critic's share of phase 5, an update towards this batch's GAE returns."""

    critic: CriticGroup
    targets: ValueBatch  # the whole rollout batch: the critic's values before the update, and the returns
    world_size: int


@dataclass(frozen=True)
class StepAdvantages:
    """Phase 4's output for one rollout batch."""

    advantages: torch.Tensor  # (N,) per sequence, or (N, T-1) per token (REINFORCE++, PPO)
    critic_update: CriticUpdate | None  # PPO: what the critic trains on alongside the policy
    metrics: dict[str, float]


class AdvantageEstimator(Protocol):
    """What the loop asks of an algorithm family's advantages (see the module docstring)."""

    # Whether ``estimate`` reads the policy's log-probs before the update (PPO's KL-penalised rewards).
    # If not, and the update is one optimizer step, the loop skips the separate log-prob pass.
    needs_policy_logprobs: bool

    def estimate(self, rewards: torch.Tensor, tokens: TokenBatch, old_logps: torch.Tensor | None,
                 ref_logps: torch.Tensor | None, valid: torch.Tensor | None = None) -> StepAdvantages:
        """``valid`` (N,) bool: False for completions left out of the statistics (GRPO family only)."""
        ...

    def objective(self, base: PolicyGradientObjective) -> PolicyGradientObjective:
        """This step's policy loss settings (PPO's KL coefficient may adapt)."""
        ...

    def observe(self, estimated: StepAdvantages, num_sequences: int) -> None:
        """After the update: adapt what adapts (PPO's KL coefficient)."""
        ...

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...


def sequence_advantages(rewards: torch.Tensor, group_size: int, mask: torch.Tensor, *, advantage: str,
                        scale: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) sequence advantages (group, rloo), or (N, T-1) token advantages for REINFORCE++: each
    completion's score at its last token, returns over tokens (gamma 1: the score at every token),
    whitened over all tokens of the batch (Hu 2025; the KL stays a loss term here). The "baseline"
    variant subtracts each group's mean score first. ``valid`` (N,) bool: False for completions left
    out of the statistics (advantage 0; ``rewards[i].on_failure: exclude``)."""
    if advantage == "rloo":
        return rloo_advantages(rewards, group_size, valid=valid)
    if advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        scores = (group_advantages(rewards, group_size, scale="none", valid=valid)
                  if advantage == "reinforce_pp_baseline" else rewards)
        if valid is not None:
            mask = mask & valid.bool()[:, None]  # no returns, no part in the whitening, advantage 0
        token_rewards = torch.zeros(mask.shape, dtype=torch.float32)
        last = mask.long().cumsum(-1).argmax(-1)  # each row's last completion token
        token_rewards[torch.arange(len(rewards)), last] = scores.float()
        advantages, _ = reinforce_pp_advantages(token_rewards, mask)
        return advantages
    return group_advantages(rewards, group_size, scale=scale, valid=valid)


class GroupAdvantages:
    """The GRPO family's advantages: relative to each prompt's group of samples, no critic."""

    needs_policy_logprobs = False

    def __init__(self, *, group_size: int, advantage: str, scale: str):
        self.group_size, self.advantage, self.scale = group_size, advantage, scale

    def estimate(self, rewards: torch.Tensor, tokens: TokenBatch, old_logps: torch.Tensor | None,
                 ref_logps: torch.Tensor | None, valid: torch.Tensor | None = None) -> StepAdvantages:
        advantages = sequence_advantages(rewards, self.group_size, tokens.loss_mask[:, 1:], advantage=self.advantage,
                                         scale=self.scale, valid=valid)
        return StepAdvantages(advantages, None, {})

    def objective(self, base: PolicyGradientObjective) -> PolicyGradientObjective:
        return base

    def observe(self, estimated: StepAdvantages, num_sequences: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class PPOAdvantageSettings:
    """What ``ppo_advantages`` needs of the PPO settings (kl_coef is the current, maybe adapted, one)."""

    kl_coef: float = 0.05
    kl_kind: str = "k1"
    kl_in: str = "reward"
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True


def ppo_advantages(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                   values: torch.Tensor, mask: torch.Tensor,
                   settings: PPOAdvantageSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's (B, T-1) token advantages, returns and per-token rewards of one rollout batch.

    Per-token rewards are the sequence score at the last completion token minus kl_coef x KL_t to the
    reference (``kl_penalized_rewards``; with ``kl_in="loss"`` or no reference, the score alone);
    advantages and returns are GAE over the critic's values (``gae_advantages``)."""
    if ref_logps is None or settings.kl_in != "reward":
        ref_logps, kl_coef = old_logps, 0.0
    else:
        kl_coef = settings.kl_coef
    token_rewards = kl_penalized_rewards(scores, old_logps, ref_logps, mask, kl_coef=kl_coef,
                                         kl_kind=settings.kl_kind)
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma=settings.gamma, lam=settings.lam,
                                         whiten=settings.whiten)
    return advantages, returns, token_rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1: perfect critic)."""
    m = mask.bool()
    r, v = returns[m], values[m]
    if r.numel() < 2:
        return float("nan")
    var = r.var()
    return float(1 - (r - v).var() / var) if var > 0 else float("nan")


def sequence_kl(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of the summed k1 KL(pi || ref) of the sampled tokens."""
    return float(((old_logps - ref_logps) * mask).sum(-1).mean())


class GAEAdvantages:
    """PPO's advantages: GAE over the critic's values of KL-penalised per-token rewards."""

    needs_policy_logprobs = True

    def __init__(self, critic: CriticGroup, settings: PPOSettings, *, micro_batch_size: int, critic_world_size: int):
        self.critic = critic
        self.critic_world_size = critic_world_size
        self.settings = settings
        self.micro_batch_size = micro_batch_size
        self.kl_controller = (AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
                              if settings.adaptive_kl else None)

    @property
    def kl_coef(self) -> float:
        """The KL coefficient in force (adapted with ``ppo.adaptive_kl``)."""
        return self.kl_controller.value if self.kl_controller is not None else self.settings.kl_coef

    def estimate(self, rewards: torch.Tensor, tokens: TokenBatch, old_logps: torch.Tensor,
                 ref_logps: torch.Tensor | None, valid: torch.Tensor | None = None) -> StepAdvantages:
        assert valid is None or bool(valid.all()), "PPO has no group to leave a completion out of (config refuses it)"
        started = time.perf_counter()
        values = self.critic.values(tokens, micro_batch_size=self.micro_batch_size)
        values_s = time.perf_counter() - started
        mask = tokens.loss_mask[:, 1:]
        settings = self.settings
        advantages, returns, token_rewards = ppo_advantages(
            rewards, old_logps, ref_logps, values, mask, PPOAdvantageSettings(
                kl_coef=self.kl_coef, kl_kind=settings.kl_kind, kl_in=settings.kl_in, gamma=settings.gamma,
                lam=settings.lam, whiten=settings.whiten_advantages))
        m = mask.float()
        metrics = {"time/values": values_s, "kl_coef": self.kl_coef,
                   "returns/mean": float((returns * m).sum() / m.sum().clamp_min(1)),
                   "values/mean": float((values * m).sum() / m.sum().clamp_min(1)),
                   "token_rewards/sum_mean": float((token_rewards * m).sum(-1).mean()),
                   "critic/explained_variance": explained_variance(values, returns, mask)}
        if ref_logps is not None:
            metrics["kl/rollout"] = sequence_kl(old_logps, ref_logps, m)
        update = CriticUpdate(self.critic, ValueBatch(tokens, values, returns), self.critic_world_size)
        return StepAdvantages(advantages, update, metrics)

    def objective(self, base: PolicyGradientObjective) -> PolicyGradientObjective:
        return replace(base, kl_coef=self.kl_coef) if self.settings.kl_in == "loss" else base

    def observe(self, estimated: StepAdvantages, num_sequences: int) -> None:
        if self.kl_controller is not None and "kl/rollout" in estimated.metrics:
            self.kl_controller.update(estimated.metrics["kl/rollout"], n_steps=num_sequences)

    def state(self) -> dict[str, Any]:
        # the adaptive coefficient resumes too
        return {"kl_coef": self.kl_controller.value} if self.kl_controller is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.kl_controller is not None:
            self.kl_controller.value = state.get("kl_coef", self.kl_controller.value)


def advantage_estimator(config: GRPOConfig | PPOConfig, critic: CriticGroup | None) -> AdvantageEstimator:
    """The estimator of the config's algorithm family (PPO's needs the critic role)."""
    if isinstance(config, PPOConfig):
        assert critic is not None, "PPO runs with a critic role"
        return GAEAdvantages(critic, config.ppo, micro_batch_size=config.train.micro_batch_size,
                             critic_world_size=config.critic.world_size)
    return GroupAdvantages(group_size=config.rollout.group_size, advantage=config.grpo.advantage,
                           scale=config.grpo.scale)
