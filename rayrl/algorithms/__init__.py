"""Pure-tensor RL/post-training algorithms: log-probs, loss aggregation, KL estimators, and the
SFT / reward-model / preference / PPO / GRPO-family losses and advantage estimators.

No config objects, no distributed calls: every function takes tensors and keyword arguments
and returns tensors (losses also return a dict of detached stats). Each docstring names the
paper and the equation it computes.
"""

from .aggregation import (
    AggregationMode,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    num_tokens_and_seqs,
)
from .grpo import (
    group_advantages,
    overlong_mask,
    overlong_penalty,
    policy_gradient_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    truncated_is_weights,
)
from .kl import KLKind, kl_estimate
from .off_policy import OFF_POLICY_CORRECTIONS, OffPolicyCorrection, off_policy_weights
from .logprobs import entropy_from_logits, sequence_logprobs, token_logprobs
from .ppo import AdaptiveKLController, clipped_policy_loss, clipped_value_loss, gae_advantages, kl_penalized_rewards
from .preference import (
    DPOLossType,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    nll_from_logps,
    orpo_loss,
    simpo_loss,
)
from .reward_model import reward_model_loss
from .sft import sft_loss

__all__ = [
    # log-probs
    "token_logprobs",
    "entropy_from_logits",
    "sequence_logprobs",
    # aggregation
    "AggregationMode",
    "aggregate_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "num_tokens_and_seqs",
    # KL
    "KLKind",
    "kl_estimate",
    # SFT / reward model
    "sft_loss",
    "reward_model_loss",
    # preference
    "DPOLossType",
    "dpo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_reference_point",
    "nll_from_logps",
    # PPO
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae_advantages",
    "kl_penalized_rewards",
    "AdaptiveKLController",
    # GRPO family
    "group_advantages",
    "policy_gradient_loss",
    "truncated_is_weights",
    "overlong_mask",
    "overlong_penalty",
    "rloo_advantages",
    "reinforce_pp_advantages",
    # off-policy correction (asynchronous RL)
    "OffPolicyCorrection",
    "OFF_POLICY_CORRECTIONS",
    "off_policy_weights",
]
