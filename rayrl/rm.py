"""Reward-model training as a single-actor stage: Bradley-Terry on preference pairs.

The model is the causal LM checkpoint with a fresh one-scalar head (HF sequence classification);
the loss is -log sigmoid(r_chosen - r_rejected [- margin]) [+ centring], the eval is held-out pairwise
accuracy. The export loads with AutoModelForSequenceClassification (the PPO stage's reward model).

Run:  rayrl train examples/rm.yaml [key=value ...]
"""

from __future__ import annotations

import time
from typing import Any

from rayrl.cluster import trainer_roles
from rayrl.config import RewardModelConfig
from rayrl.data.batching import StepBatcher
from rayrl.data.preference import collate_pairs, load_preference_pairs
from rayrl.stage_common import StageResult, prepare_stage, run_training_steps, stage_run, trainer_spec
from rayrl.trainer_group import RewardTrainerGroup


def run_rm(config: RewardModelConfig) -> StageResult:
    started = time.perf_counter()
    setup = prepare_stage(config)
    tokenizer = setup.tokenizer
    pad_id = tokenizer.pad_token_id

    # 1. Data: preference pairs, chosen and rejected rows collated together.
    margin_field = config.rm.margin_field
    train_pairs, data_stats = load_preference_pairs(config.data.train, tokenizer, config.data.max_length,
                                                    margin_field=margin_field)
    eval_pairs = (load_preference_pairs(config.data.eval, tokenizer, config.data.max_length,
                                        margin_field=margin_field)[0][: config.eval.max_examples]
                  if config.data.eval else [])
    batcher = StepBatcher(train_pairs, global_batch_size=config.train.global_batch_size,
                          micro_batch_size=config.train.micro_batch_size, world_size=config.trainer.world_size,
                          seed=config.seed, shuffle=config.data.shuffle,
                          collate=lambda pairs: collate_pairs(pairs, pad_id), unit="pairs")
    total_steps = config.train.max_steps or batcher.steps_for_epochs(config.train.epochs)
    size = config.train.micro_batch_size
    eval_batches = [collate_pairs(eval_pairs[i:i + size], pad_id) for i in range(0, len(eval_pairs), size)]

    def evaluate() -> dict[str, float]:
        stats = trainers.eval_pairs(eval_batches, config.rm.center_coef)
        return {f"eval/{k}": v for k, v in stats.items()}

    with stage_run(config, setup, roles=trainer_roles(config), total_steps=total_steps, description="rm") as run:
        # 2. The reward-model group: N DeepSpeed ranks, one Ray actor each.
        trainers = RewardTrainerGroup(trainer_spec(config, setup.model_path, total_steps),
                                      num_cpus=config.trainer.num_cpus, num_gpus=config.trainer.num_gpus,
                                      resources=config.trainer.resources, role_kwargs={"pad_token_id": pad_id},
                                      timeouts=config.fault.timeouts)
        run.on_exit(trainers.shutdown)

        def train_step(batches) -> tuple[dict[str, Any], int]:
            metrics = trainers.train_reward_step(batches, global_num_pairs=config.train.global_batch_size,
                                                 center_coef=config.rm.center_coef)
            return metrics, sum(b.tokens.num_tokens for rank in batches for b in rank)

        # 3. One optimizer step per global batch of pairs; eval, checkpoints; the reward model in
        # Hugging Face format (AutoModelForSequenceClassification).
        final_model, final_eval = run_training_steps(
            config, setup, trainers, run.tracker, total_steps=total_steps, batcher=batcher, train_step=train_step,
            evaluate=evaluate if eval_batches else None, data_stats=data_stats)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)
