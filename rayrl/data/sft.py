"""SFT data: rows -> token ids with a completion-only loss mask -> per-step, per-rank micro-batches.

Accepted rows: ``{"prompt": str, "completion": str}`` (the completion gets the EOS token appended)
or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the model's chat template is applied and
the loss covers the assistant turns only, each with its end-of-turn token).

Truncation policy: a row longer than ``max_length`` is cut at the end (the prompt's start is kept);
a row with no completion token left after the cut is dropped. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayrl.data.batch import collate
from rayrl.data.batching import StepBatcher
from rayrl.data.loading import DataError, Row, read_rows, require_field


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    loss_mask: list[bool]  # True on completion / assistant tokens
    truncated: bool
    prompt_ids: list[int]  # for generation-based eval: the prompt alone
    answer: str | None  # reference answer for exact-match eval (``answer`` field, else the completion)


@dataclass(frozen=True)
class SFTDataStats:
    rows: int
    examples: int
    truncated: int
    dropped: int


def _ids(encoding) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


def tokenize_prompt_completion(row: Row, tokenizer) -> tuple[list[int], list[bool], list[int], str]:
    prompt = require_field(row, "prompt")
    completion = require_field(row, "completion")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and completion_ids[-1:] != [tokenizer.eos_token_id]:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    return ids, [False] * len(prompt_ids) + [True] * len(completion_ids), prompt_ids, completion


def tokenize_messages(row: Row, tokenizer) -> tuple[list[int], list[bool], list[int], str]:
    messages = require_field(row, "messages", list)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise DataError(f"{row.where}: field 'messages[{i}]' must be an object with 'role' and string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.where}: field 'messages' has no assistant turn to train on")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.where}: 'messages' data needs a tokenizer with a chat template")
    # Mark the tokens each assistant turn adds: render the conversation up to the turn (with the
    # generation prompt) and through it; the difference is the turn's content and its end token.
    ids: list[int] = []
    mask: list[bool] = []
    first_prompt: list[int] | None = None
    last_answer = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
        through = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if through[: len(before)] != before or before[: len(ids)] != ids:
            raise DataError(f"{row.where}: the chat template does not render turns as a growing prefix; "
                            "cannot mask assistant tokens")
        if first_prompt is None:
            first_prompt = before
        mask += [False] * (len(before) - len(ids)) + [True] * (len(through) - len(before))
        ids = through
        last_answer = message["content"]
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    mask += [False] * (len(full) - len(ids))  # trailing non-assistant turns
    return full, mask, first_prompt or [], last_answer


def tokenize_sft_row(row: Row, tokenizer, max_length: int) -> SFTExample | None:
    """Tokenize one row; None when truncation leaves no completion token (the row is dropped)."""
    if "messages" in row.fields:
        ids, mask, prompt_ids, answer = tokenize_messages(row, tokenizer)
    elif "prompt" in row.fields or "completion" in row.fields:
        ids, mask, prompt_ids, answer = tokenize_prompt_completion(row, tokenizer)
    else:
        present = ", ".join(sorted(row.fields)) or "none"
        raise DataError(f"{row.where}: missing field 'prompt'/'completion' or 'messages' (fields present: {present})")
    if "answer" in row.fields:
        answer = str(row.fields["answer"])
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):  # position 0 is never a target
        return None
    return SFTExample(ids, mask, truncated, prompt_ids, answer)


def load_sft_examples(source: str, tokenizer, max_length: int) -> tuple[list[SFTExample], SFTDataStats]:
    rows = read_rows(source)
    if not rows:
        raise DataError(f"dataset {source!r} has no rows")
    examples = []
    for row in rows:
        example = tokenize_sft_row(row, tokenizer, max_length)
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"dataset {source!r}: every row was dropped by truncation to max_length={max_length}")
    truncated = sum(e.truncated for e in examples)
    return examples, SFTDataStats(len(rows), len(examples), truncated, len(rows) - len(examples))


# A row ready for collation: (ids, loss_mask, position_ids, segment_ids)
PackedRow = tuple[list[int], list[bool], list[int], list[int]]


def unpacked_rows(examples: list[SFTExample]) -> list[PackedRow]:
    return [(e.input_ids, e.loss_mask, list(range(len(e.input_ids))), [1] * len(e.input_ids)) for e in examples]


def pack_rows(examples: list[SFTExample], max_length: int) -> list[PackedRow]:
    """Greedy packing in order: examples are appended to the current row until it would overflow.

    Position ids restart at 0 per example; segment ids number the examples within the row so the
    attention mask can keep them apart.
    """
    rows: list[PackedRow] = []
    ids: list[int] = []
    mask: list[bool] = []
    pos: list[int] = []
    seg: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        if ids and len(ids) + n > max_length:
            rows.append((ids, mask, pos, seg))
            ids, mask, pos, seg = [], [], [], []
        segment = (seg[-1] + 1) if seg else 1
        ids = ids + example.input_ids
        mask = mask + example.loss_mask
        pos = pos + list(range(n))
        seg = seg + [segment] * n
    if ids:
        rows.append((ids, mask, pos, seg))
    return rows


def sft_step_batcher(examples: list[SFTExample], *, packing: bool, max_length: int, pad_id: int,
                     **batching) -> StepBatcher:
    """A StepBatcher over SFT rows: each epoch's shuffled examples, packed if asked, then collated."""
    make_rows = (lambda ordered: pack_rows(ordered, max_length)) if packing else unpacked_rows
    return StepBatcher(examples, make_rows=make_rows, collate=lambda rows: collate(rows, pad_id),
                       unit="rows after packing" if packing else "rows", **batching)
