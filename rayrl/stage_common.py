"""The set-up, schedules and evaluation that every single-actor stage (SFT, RM, DPO) shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrl.checkpoint import CheckpointManager
from rayrl.outputs import prepare_output_dir
from rayrl.tiny import resolve_model_path
from rayrl.tracking import truncate_metrics


@dataclass(frozen=True)
class StageResult:
    output_dir: Path
    final_model: Path
    final_eval: dict[str, float]
    steps: int
    wall_s: float


@dataclass(frozen=True)
class StageSetup:
    output_dir: Path
    model_path: str
    tokenizer: Any
    checkpoints: CheckpointManager
    resume_from: Path | None
    start_step: int


def prepare_stage(config) -> StageSetup:
    """Output dir, model path and tokenizer, and where to resume from (if asked and possible)."""
    from transformers import AutoTokenizer

    output_dir = prepare_output_dir(config)
    model_path = resolve_model_path(config.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    checkpoints = CheckpointManager(output_dir / "checkpoints", config.checkpoint.keep_last)
    resume_from = checkpoints.latest() if config.checkpoint.resume else None
    start_step = CheckpointManager.load_state(resume_from)["step"] if resume_from else 0
    if resume_from:
        truncate_metrics(output_dir, start_step)
    return StageSetup(output_dir, model_path, tokenizer, checkpoints, resume_from, start_step)


def eval_due(config, done: int, total: int) -> bool:
    return done == total or bool(config.eval.every_steps and done % config.eval.every_steps == 0)


def checkpoint_due(config, done: int, total: int) -> bool:
    return bool(config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0 and done < total)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    if "<|end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|end|>"))
    return sorted(i for i in ids if i is not None)


@dataclass(frozen=True)
class GenerationEvalSet:
    prompt_ids: list[list[int]]
    answers: list[str]


def load_generation_eval(source: str, tokenizer, max_examples: int) -> GenerationEvalSet:
    """Rows with ``prompt`` (text or messages) and ``answer`` (or ``completion``) for exact match."""
    from rayrl.data.loading import DataError, read_rows, require_field

    prompts, answers = [], []
    for row in read_rows(source)[:max_examples]:
        prompt = require_field(row, "prompt", (str, list))
        if "answer" not in row.fields and "completion" not in row.fields:
            raise DataError(f"{row.where}: missing field 'answer' (or 'completion') for exact-match eval")
        answers.append(str(row.fields.get("answer", row.fields.get("completion"))))
        if isinstance(prompt, list):
            encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            prompts.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
        else:
            prompts.append(tokenizer(prompt)["input_ids"])
    return GenerationEvalSet(prompts, answers)


def generation_accuracy(trainers, eval_set: GenerationEvalSet, tokenizer, max_new_tokens: int) -> float:
    """Exact-match accuracy of greedy generation by the trainer group's current weights."""
    from rayrl.evaluation import exact_match_accuracy

    completions = trainers.generate(eval_set.prompt_ids, max_new_tokens=max_new_tokens,
                                    pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(tokenizer))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return exact_match_accuracy(texts, eval_set.answers)
