"""Supervised fine-tuning as a single-actor stage: a DeepSpeed PolicyTrainer group on Ray.

Loss: the token-mean negative log-likelihood of the completion (or assistant) tokens over the whole
global batch, whatever its split into ranks and micro-batches (see TrainingEngine.optimizer_step).

Run:  rayrl train examples/sft.yaml [key=value ...]
"""

from __future__ import annotations

import time
from typing import Any

from rayrl.cluster import trainer_roles
from rayrl.config import SFTConfig
from rayrl.data.batch import collate
from rayrl.data.sft import SFTExample, load_sft_examples, sft_step_batcher, unpacked_rows
from rayrl.stage_common import (GenerationEvalSet, StageResult, generation_accuracy, prepare_stage,
                                run_training_steps, stage_run, trainer_spec)
from rayrl.trainer_group import PolicyTrainerGroup


def evaluate(trainers: PolicyTrainerGroup, examples: list[SFTExample], tokenizer, config: SFTConfig) -> dict[str, float]:
    """Held-out loss and exact-match accuracy of greedy generation against each row's answer."""
    examples = examples[: config.eval.max_examples]
    rows = unpacked_rows(examples)
    size = config.train.micro_batch_size
    loss = trainers.eval_loss([collate(rows[i:i + size], tokenizer.pad_token_id) for i in range(0, len(rows), size)])
    eval_set = GenerationEvalSet([e.prompt_ids for e in examples], [e.answer for e in examples])
    return {"eval/loss": loss,
            "eval/accuracy": generation_accuracy(trainers, eval_set, tokenizer, config.eval.max_new_tokens)}


def run_sft(config: SFTConfig) -> StageResult:
    started = time.perf_counter()
    setup = prepare_stage(config)
    tokenizer = setup.tokenizer

    # 1. Data: tokenize once on the driver; the batcher maps a step number to its rows.
    train_examples, data_stats = load_sft_examples(config.data.train, tokenizer, config.data.max_length)
    eval_examples = (load_sft_examples(config.data.eval, tokenizer, config.data.max_length)[0]
                     if config.data.eval else [])
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
                                      resources=config.trainer.resources)
        run.on_exit(trainers.shutdown)

        def train_step(batches) -> tuple[dict[str, Any], int]:
            num_loss_tokens = sum(b.num_loss_tokens for rank in batches for b in rank)
            metrics = trainers.train_sft_step(batches, global_num_tokens=num_loss_tokens)
            return {**metrics, "num_loss_tokens": num_loss_tokens}, sum(b.num_tokens for rank in batches for b in rank)

        # 3. One optimizer step per global batch; eval and checkpoints on their schedules; the final model.
        final_model, final_eval = run_training_steps(
            config, setup, trainers, run.tracker, total_steps=total_steps, batcher=batcher, train_step=train_step,
            evaluate=(lambda: evaluate(trainers, eval_examples, tokenizer, config)) if eval_examples else None,
            data_stats=data_stats)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)
