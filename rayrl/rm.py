"""Reward-model training as a single-actor stage: Bradley-Terry on preference pairs.

The model is the causal LM checkpoint with a fresh one-scalar head (HF sequence classification);
the loss is -log sigmoid(r_chosen - r_rejected [- margin]) [+ centring], the eval is held-out pairwise
accuracy. The export loads with AutoModelForSequenceClassification (the PPO stage's reward model).

Run:  rayrl train examples/rm.yaml [key=value ...]
"""

from __future__ import annotations

import time
from typing import Any

from rayrl.actors.reward_trainer import RewardModelTrainer
from rayrl.cluster import check_cluster_resources, ray_session, trainer_roles
from rayrl.config import RewardModelConfig, config_to_dict
from rayrl.data.batching import StepBatcher
from rayrl.data.preference import collate_pairs, load_preference_pairs
from rayrl.outputs import export_final_model
from rayrl.sft import trainer_spec
from rayrl.stage_common import StageResult, checkpoint_due, eval_due, prepare_stage
from rayrl.tracking import Tracker
from rayrl.trainer_group import TrainerGroup


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
        stats = trainers.rank0("eval_pairs", eval_batches, config.rm.center_coef)
        return {f"eval/{k}": v for k, v in stats.items()}

    with ray_session(config.ray):
        check_cluster_resources(config.ray, trainer_roles(config))
        # 2. The reward-model group: N DeepSpeed ranks, one Ray actor each.
        trainers = TrainerGroup(trainer_spec(config, setup.model_path, total_steps),
                                num_cpus=config.trainer.num_cpus, num_gpus=config.trainer.num_gpus,
                                role=RewardModelTrainer, role_kwargs={"pad_token_id": pad_id})
        tracker = Tracker(setup.output_dir, config=config_to_dict(config), wandb=config.tracking.wandb,
                          total_steps=total_steps, start_step=setup.start_step,
                          progress=config.tracking.progress, description="rm")
        try:
            if setup.resume_from:
                trainers.load_checkpoint(str(setup.resume_from))
                tracker.write(f"resumed from {setup.resume_from} (step {setup.start_step})")
            else:
                tracker.log(0, {"data/rows": data_stats.rows, "data/truncated": data_stats.truncated,
                                "data/dropped": data_stats.dropped, "total_steps": total_steps})
            if eval_batches and config.eval.at_start and setup.start_step == 0:
                tracker.log(0, evaluate())

            final_eval: dict[str, float] = {}
            for step in range(setup.start_step, total_steps):
                # 3. One optimizer step over the global batch of pairs.
                step_start = time.perf_counter()
                batches = batcher.step_batches(step)
                num_tokens = sum(b.tokens.num_tokens for rank in batches for b in rank)
                metrics: dict[str, Any] = trainers.train_reward_step(
                    batches, global_num_pairs=config.train.global_batch_size, center_coef=config.rm.center_coef)
                elapsed = time.perf_counter() - step_start
                metrics.update(tokens_per_s=num_tokens / elapsed, num_tokens=num_tokens,
                               epoch=batcher.epoch_of(step + 1), step_s=elapsed)
                tracker.log(step + 1, metrics)
                tracker.advance()

                # 4. Eval and checkpoint on their schedules.
                done = step + 1
                if eval_batches and eval_due(config, done, total_steps):
                    final_eval = evaluate()
                    tracker.log(done, final_eval)
                if checkpoint_due(config, done, total_steps):
                    setup.checkpoints.save(done, lambda d: trainers.save_checkpoint(str(d)),
                                           {"total_steps": total_steps})

            # 5. The reward model, in Hugging Face format (AutoModelForSequenceClassification).
            final_model = export_final_model(trainers, tokenizer, setup.output_dir)
        finally:
            tracker.close()
            trainers.shutdown()
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)
