"""Rollout batches: sampled completions turned into typed training rows for the policy-gradient step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayrl.data.batch import TokenBatch, collate
from rayrl.data.loading import DataError, read_rows, require_field


@dataclass(frozen=True)
class PromptRow:
    prompt: str  # the text the reward functions see
    prompt_ids: list[int]
    fields: dict  # every other field of the row (e.g. ``answer``), passed to reward functions


@dataclass(frozen=True)
class RolloutBatch:
    """One micro-batch of completions for the policy-gradient loss. All (B, T-1) tensors are aligned
    with next-token targets: position t scores token t+1 of ``tokens``."""

    tokens: TokenBatch  # (B, T) prompt + completion; loss_mask on completion tokens
    advantages: torch.Tensor  # (B,) sequence advantages (GRPO family) or (B, T-1) token advantages (PPO)
    # (B, T-1) trainer log-probs before this batch's updates; None when the update is one optimizer step
    # (on-policy): the training forward's own detached log-probs are the ratio's denominator then.
    old_logps: torch.Tensor | None
    sampler_logps: torch.Tensor  # (B, T-1) the rollout engine's log-probs (0 off the completion)
    ref_logps: torch.Tensor | None  # (B, T-1) reference log-probs, when a KL term is on
    overlong: torch.Tensor  # (B,) bool: cut at max_new_tokens (DAPO overlong filtering)

    @property
    def num_examples(self) -> int:
        return self.tokens.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The rows ``rows``, every field alike."""
        return RolloutBatch(self.tokens.select(rows), self.advantages[rows],
                            None if self.old_logps is None else self.old_logps[rows],
                            self.sampler_logps[rows], None if self.ref_logps is None else self.ref_logps[rows],
                            self.overlong[rows])

    def without_targets(self) -> RolloutBatch:
        """The same rows training on nothing (all targets masked): a rank's filler micro-batch."""
        return RolloutBatch(self.tokens.without_targets(), self.advantages, self.old_logps, self.sampler_logps,
                            self.ref_logps, self.overlong)

    def trimmed(self) -> RolloutBatch:
        """Cut to the longest row's length (the padding columns cost a forward and carry no loss)."""
        width = self.tokens.width
        per_token = slice(None, width - 1)  # (B, T-1) fields: one column fewer than the tokens
        advantages = self.advantages if self.advantages.dim() == 1 else self.advantages[:, per_token]
        return RolloutBatch(self.tokens.trimmed(width), advantages,
                            None if self.old_logps is None else self.old_logps[:, per_token],
                            self.sampler_logps[:, per_token],
                            None if self.ref_logps is None else self.ref_logps[:, per_token], self.overlong)


@dataclass(frozen=True)
class ValueBatch:
    """One micro-batch for the PPO critic's clipped value loss; (B, T-1) tensors aligned like RolloutBatch's."""

    tokens: TokenBatch  # (B, T) prompt + completion; loss_mask on completion tokens
    old_values: torch.Tensor  # (B, T-1) the critic's values before this batch's updates
    returns: torch.Tensor  # (B, T-1) GAE returns (the value targets)

    @property
    def num_examples(self) -> int:
        return self.tokens.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> ValueBatch:
        return ValueBatch(self.tokens.select(rows), self.old_values[rows], self.returns[rows])

    def without_targets(self) -> ValueBatch:
        """The same rows training on nothing (all targets masked): a rank's filler micro-batch."""
        return ValueBatch(self.tokens.without_targets(), self.old_values, self.returns)

    def trimmed(self) -> ValueBatch:
        """Cut to the longest row's length, as ``RolloutBatch.trimmed``."""
        width = self.tokens.width
        return ValueBatch(self.tokens.trimmed(width), self.old_values[:, :width - 1], self.returns[:, :width - 1])


def load_prompts(source: str, tokenizer, max_prompt_length: int, *, drop_long: bool = False) -> list[PromptRow]:
    """Prompt rows (text or chat messages) with their token ids and extra fields. A prompt over
    ``max_prompt_length`` tokens is an error naming its file and line, or with ``drop_long`` is
    skipped (how many is printed; a dataset left empty is still an error)."""
    rows = read_rows(source)
    if not rows:
        raise DataError(f"dataset {source!r} has no rows")
    prompts = []
    dropped = 0
    for row in rows:
        prompt = require_field(row, "prompt", (str, list))
        if isinstance(prompt, list):
            encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
            text = tokenizer.decode(ids)
        else:
            ids, text = tokenizer(prompt)["input_ids"], prompt
        if len(ids) > max_prompt_length:
            if drop_long:
                dropped += 1
                continue
            raise DataError(f"{row.where}: prompt is {len(ids)} tokens, over data.max_prompt_length "
                            f"({max_prompt_length}); raise it, or set data.drop_long_prompts: true to skip such rows")
        fields = {k: v for k, v in row.fields.items() if k not in ("prompt", "completion")}
        prompts.append(PromptRow(text, ids, fields))
    if dropped:
        print(f"{source}: skipped {dropped} of {len(rows)} prompts over data.max_prompt_length ({max_prompt_length} tokens)")
    if not prompts:
        raise DataError(f"dataset {source!r}: every prompt is over data.max_prompt_length ({max_prompt_length})")
    return prompts


def completion_tokens(prompt_ids: list[list[int]], completion_ids: list[list[int]], sampler_logps: list[list[float]],
                      pad_id: int) -> tuple[TokenBatch, torch.Tensor]:
    """Prompt+completion rows (loss on the completion) and the sampler's log-probs aligned to them."""
    rows = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        ids = prompt + completion
        rows.append((ids, [False] * len(prompt) + [True] * len(completion), list(range(len(ids))), [1] * len(ids)))
    tokens = collate(rows, pad_id)
    aligned = torch.zeros(tokens.input_ids.shape[0], tokens.input_ids.shape[1] - 1)
    for i, (prompt, logps) in enumerate(zip(prompt_ids, sampler_logps, strict=True)):
        # target position t predicts token t+1: completion token j sits at len(prompt)+j, so at t = len(prompt)+j-1
        start = len(prompt) - 1
        aligned[i, start:start + len(logps)] = torch.tensor(logps, dtype=torch.float32)
    return tokens, aligned
