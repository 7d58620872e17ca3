"""Supervised fine-tuning as a single-actor stage: a DeepSpeed PolicyTrainer group on Ray.

Loss: the token-mean negative log-likelihood of the completion (or assistant) tokens over the whole
global batch, whatever its split into ranks and micro-batches (see TrainingEngine.optimizer_step).

Run:  rayrl train examples/sft.yaml [key=value ...]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rayrl.cluster import trainer_roles
from rayrl.config import SFTConfig
from rayrl.data.batch import collate
from rayrl.data.sft import SFTExample, load_sft_examples, sft_step_batcher, unpacked_rows
from rayrl.data.loading import read_rows
from rayrl.stage_common import (GenerationEvalSet, StageResult, generation_accuracy, load_generation_eval,
                                prepare_stage, run_training_steps, stage_run, trainer_spec)
from rayrl.trainer_group import PolicyTrainerGroup


@dataclass(frozen=True)
class SFTEvalData:
    """Held-out rows with a completion (for ``eval/loss``) and prompts with answers (``eval/accuracy``)."""

    loss_examples: list[SFTExample]
    accuracy_set: GenerationEvalSet | None


def load_sft_eval(config: SFTConfig, tokenizer) -> SFTEvalData:
    """``data.eval`` rows with a completion (prompt/completion or messages) give the held-out loss and,
    against each row's answer, the accuracy; prompt/answer rows (the RL and DPO stages' form) give the
    accuracy only. ``eval.generation_data`` (prompt/answer rows), when set, is the accuracy set."""
    examples: list[SFTExample] = []
    accuracy: GenerationEvalSet | None = None
    max_examples = config.eval.max_examples
    if config.data.eval:
        first = read_rows(config.data.eval)[:1]
        fields = first[0].fields if first else {}
        if "answer" in fields and "completion" not in fields and "messages" not in fields:
            accuracy = load_generation_eval(config.data.eval, tokenizer, max_examples)
        else:
            examples = load_sft_examples(config.data.eval, tokenizer, config.data.max_length)[0][:max_examples]
            accuracy = GenerationEvalSet([e.prompt_ids for e in examples], [e.answer for e in examples])
    if config.eval.generation_data:
        accuracy = load_generation_eval(config.eval.generation_data, tokenizer, max_examples)
    return SFTEvalData(examples, accuracy)


def evaluate(trainers: PolicyTrainerGroup, data: SFTEvalData, tokenizer, config: SFTConfig) -> dict[str, float]:
    """Held-out loss (rows with a completion) and exact-match accuracy of greedy generation."""
    metrics: dict[str, float] = {}
    if data.loss_examples:
        rows = unpacked_rows(data.loss_examples)
        size = config.train.micro_batch_size
        metrics["eval/loss"] = trainers.eval_loss([collate(rows[i:i + size], tokenizer.pad_token_id)
                                                   for i in range(0, len(rows), size)])
    if data.accuracy_set is not None:
        metrics["eval/accuracy"] = generation_accuracy(trainers, data.accuracy_set, tokenizer,
                                                       config.eval.max_new_tokens)
    return metrics


def run_sft(config: SFTConfig) -> StageResult:
    started = time.perf_counter()
    setup = prepare_stage(config)
    tokenizer = setup.tokenizer

    # 1. Data: tokenize once on the driver; the batcher maps a step number to its rows.
    train_examples, data_stats = load_sft_examples(config.data.train, tokenizer, config.data.max_length)
    eval_data = load_sft_eval(config, tokenizer)
    batcher = sft_step_batcher(
        train_examples, packing=config.data.packing, max_length=config.data.max_length,
        pad_id=tokenizer.pad_token_id, global_batch_size=config.train.global_batch_size,
        micro_batch_size=config.train.micro_batch_size, world_size=config.trainer.world_size,
        seed=config.seed, shuffle=config.data.shuffle)
    total_steps = config.train.max_steps or batcher.steps_for_epochs(config.train.epochs)

    with stage_run(config, setup, roles=trainer_roles(config), total_steps=total_steps, description="sft") as run:
        # 2. The trainer group: N DeepSpeed ranks, one Ray actor each.
        trainers = PolicyTrainerGroup(trainer_spec(config, setup.model_path, total_steps),
                                      num_cpus=config.trainer.num_cpus, num_gpus=config.trainer.num_gpus,
                                      resources=config.trainer.resources, timeouts=config.fault.timeouts)
        run.on_exit(trainers.shutdown)

        def train_step(batches) -> tuple[dict[str, Any], int]:
            num_loss_tokens = sum(b.num_loss_tokens for rank in batches for b in rank)
            metrics = trainers.train_sft_step(batches, global_num_tokens=num_loss_tokens)
            return {**metrics, "num_loss_tokens": num_loss_tokens}, sum(b.num_tokens for rank in batches for b in rank)

        # 3. One optimizer step per global batch; eval and checkpoints on their schedules; the final model.
        final_model, final_eval = run_training_steps(
            config, setup, trainers, run.tracker, total_steps=total_steps, batcher=batcher, train_step=train_step,
            evaluate=((lambda: evaluate(trainers, eval_data, tokenizer, config))
                      if eval_data.loss_examples or eval_data.accuracy_set else None),
            data_stats=data_stats)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)
