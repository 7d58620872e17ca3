"""Preference data: prompt/chosen/rejected pairs (reward model, DPO family) and prompt/completion/label
rows (KTO), tokenized with a response-only mask and collated into typed batches.

Accepted rows:
  {"prompt": str, "chosen": str, "rejected": str}                       (EOS appended to responses)
  {"prompt": [messages], "chosen": [assistant msg] | str, "rejected": ...} (chat template applied)
  {"prompt": ..., "completion": ..., "label": bool}                      (KTO)
Truncation: a row longer than max_length is cut at the end; a row left with no response token is
dropped (both counted).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rayrl.data.batch import TokenBatch, collate
from rayrl.data.loading import DataError, Row, read_rows, require_field


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only
    rejected_ids: list[int]
    truncated: bool
    margin: float | None = None
    ref_chosen: float | None = None  # summed reference log-probs, once precomputed
    ref_rejected: float | None = None


@dataclass(frozen=True)
class UnpairedExample:
    """KTO: one completion with a desirable/undesirable label, plus a mismatched completion (another
    row's) for the KL reference point z0."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    truncated: bool
    mismatched_ids: list[int] = ()
    ref: float | None = None
    ref_mismatched: float | None = None


@dataclass(frozen=True)
class PreferenceDataStats:
    rows: int
    examples: int
    truncated: int
    dropped: int
    desirable: int = 0


@dataclass(frozen=True)
class PreferenceBatch:
    tokens: TokenBatch  # (2B, T): rows [0, B) chosen, [B, 2B) rejected; loss_mask on response tokens
    ref_logps: torch.Tensor | None  # (2B,) summed reference log-probs, when precomputed
    margins: torch.Tensor | None  # (B,) per-pair margins for the reward model, when given

    @property
    def num_examples(self) -> int:
        return self.tokens.input_ids.shape[0] // 2


@dataclass(frozen=True)
class KTOBatch:
    tokens: TokenBatch  # (B, T)
    mismatched: TokenBatch  # (B, T): the same prompts with other rows' completions (for z0)
    desirable: torch.Tensor  # (B,) bool
    ref_logps: torch.Tensor | None  # (B,)
    ref_mismatched_logps: torch.Tensor | None  # (B,)

    @property
    def num_examples(self) -> int:
        return self.tokens.input_ids.shape[0]


def _ids(encoding) -> list[int]:
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


def _response_text(row: Row, name: str) -> str:
    value = row.fields.get(name)
    if isinstance(value, list):  # conversational: a list with one assistant message
        if len(value) != 1 or not isinstance(value[0], dict) or not isinstance(value[0].get("content"), str):
            raise DataError(f"{row.where}: field '{name}' must be a string or a list with one assistant message")
        return value[0]["content"]
    return require_field(row, name)


def encode_prompt_response(row: Row, tokenizer, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for a plain or chat-format prompt."""
    prompt = row.fields.get("prompt")
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{row.where}: a message-list 'prompt' needs a tokenizer with a chat template")
        messages = prompt + [{"role": "assistant", "content": response}]
        before = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[: len(before)] != before:
            raise DataError(f"{row.where}: the chat template does not render the prompt as a prefix")
        return before, full[len(before):]
    prompt = require_field(row, "prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and response_ids[-1:] != [tokenizer.eos_token_id]:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def _fit(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], bool]:
    room = max_length - len(prompt_ids)
    return response_ids[: max(room, 0)], len(prompt_ids) + len(response_ids) > max_length


def load_preference_pairs(source: str, tokenizer, max_length: int, *, margin_field: str | None = None
                          ) -> tuple[list[PreferencePair], PreferenceDataStats]:
    rows = read_rows(source)
    if not rows:
        raise DataError(f"dataset {source!r} has no rows")
    pairs = []
    for row in rows:
        require_field(row, "prompt", (str, list))
        chosen_text, rejected_text = _response_text(row, "chosen"), _response_text(row, "rejected")
        prompt_ids, chosen = encode_prompt_response(row, tokenizer, chosen_text)
        _, rejected = encode_prompt_response(row, tokenizer, rejected_text)
        chosen, cut_c = _fit(prompt_ids, chosen, max_length)
        rejected, cut_r = _fit(prompt_ids, rejected, max_length)
        margin = float(require_field(row, margin_field, (int, float))) if margin_field else None
        if chosen and rejected:
            pairs.append(PreferencePair(prompt_ids, chosen, rejected, cut_c or cut_r, margin))
    if not pairs:
        raise DataError(f"dataset {source!r}: every row was dropped by truncation to max_length={max_length}")
    return pairs, PreferenceDataStats(len(rows), len(pairs), sum(p.truncated for p in pairs), len(rows) - len(pairs))


def load_kto_examples(source: str, tokenizer, max_length: int) -> tuple[list[UnpairedExample], PreferenceDataStats]:
    rows = read_rows(source)
    if not rows:
        raise DataError(f"dataset {source!r} has no rows")
    examples = []
    for row in rows:
        require_field(row, "prompt", (str, list))
        label = require_field(row, "label", bool)
        prompt_ids, completion = encode_prompt_response(row, tokenizer, _response_text(row, "completion"))
        completion, cut = _fit(prompt_ids, completion, max_length)
        if completion:
            examples.append(UnpairedExample(prompt_ids, completion, label, cut))
    if len(examples) < 2:
        raise DataError(f"dataset {source!r}: KTO needs at least 2 usable rows")
    # Mismatched pairs for z0: each prompt with the next row's completion (a fixed derangement).
    examples = [replace(e, mismatched_ids=_fit(e.prompt_ids, examples[(i + 1) % len(examples)].completion_ids,
                                                max_length)[0] or e.completion_ids)
                for i, e in enumerate(examples)]
    desirable = sum(e.desirable for e in examples)
    return examples, PreferenceDataStats(len(rows), len(examples), sum(e.truncated for e in examples),
                                         len(rows) - len(examples), desirable)


def _row(prompt_ids: list[int], response_ids: list[int]):
    ids = prompt_ids + response_ids
    return ids, [False] * len(prompt_ids) + [True] * len(response_ids), list(range(len(ids))), [1] * len(ids)


def pair_token_rows(pairs: list[PreferencePair]) -> list:
    """Chosen rows then rejected rows, as collate() input."""
    return [_row(p.prompt_ids, p.chosen_ids) for p in pairs] + [_row(p.prompt_ids, p.rejected_ids) for p in pairs]


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> PreferenceBatch:
    tokens = collate(pair_token_rows(pairs), pad_id)
    ref = None
    if all(p.ref_chosen is not None for p in pairs):
        ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
    margins = torch.tensor([p.margin for p in pairs]) if all(p.margin is not None for p in pairs) else None
    return PreferenceBatch(tokens, ref, margins)


def collate_unpaired(examples: list[UnpairedExample], pad_id: int) -> KTOBatch:
    tokens = collate([_row(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    mismatched = collate([_row(e.prompt_ids, list(e.mismatched_ids)) for e in examples], pad_id)
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    have_ref = all(e.ref is not None for e in examples)
    ref = torch.tensor([e.ref for e in examples], dtype=torch.float32) if have_ref else None
    ref_mm = torch.tensor([e.ref_mismatched for e in examples], dtype=torch.float32) if have_ref else None
    return KTOBatch(tokens, mismatched, desirable, ref, ref_mm)
