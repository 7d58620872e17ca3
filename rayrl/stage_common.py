"""What every stage family (SFT, RM, DPO, RL) shares: the trainer spec from a config, the stage set-up
(output dir, tokenizer, resume point; Ray session, resource check, tracker, cleanup), the step loop
of the single-actor stages, schedules and generation eval."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrl.actors.engine import TrainerSpec
from rayrl.checkpoint import CheckpointManager
from rayrl.cluster import check_cluster_resources, ray_session
from rayrl.config import config_to_dict
from rayrl.data.loading import DataError, read_rows, require_field
from rayrl.evaluation import exact_match_accuracy
from rayrl.outputs import archive_earlier_run, export_final_model, prepare_output_dir
from rayrl.tiny import resolve_model_path
from rayrl.tracking import Tracker, truncate_metrics


def trainer_spec(config, model_path: str, total_steps: int) -> TrainerSpec:
    """The per-rank engine settings of a stage config's trainer (any stage family)."""
    return TrainerSpec(
        model_path=model_path, world_size=config.trainer.world_size,
        micro_batch_size=config.train.micro_batch_size, grad_accum_steps=config.grad_accum_steps,
        total_steps=total_steps, lr=config.train.lr, lr_schedule=config.train.lr_schedule,
        warmup_steps=config.train.warmup_steps, min_lr_ratio=config.train.min_lr_ratio,
        weight_decay=config.train.weight_decay, adam_betas=tuple(config.train.adam_betas),
        grad_clip=config.train.grad_clip, dtype=config.model.dtype, zero_stage=config.trainer.zero_stage,
        deepspeed_overrides=config.trainer.deepspeed, attn_implementation=config.model.attn_implementation,
        gradient_checkpointing=config.model.gradient_checkpointing, peft=config.model.peft, seed=config.seed,
        num_threads=max(1, int(config.trainer.num_cpus)),
    )


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
    from transformers import AutoTokenizer  # slow import (transformers)

    model_path = resolve_model_path(config.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    checkpoints = CheckpointManager(Path(config.output_dir) / "checkpoints", config.checkpoint.keep_last)
    resume_from = checkpoints.latest() if config.checkpoint.resume else None
    start_step = CheckpointManager.load_state(resume_from)["step"] if resume_from else 0
    if resume_from:
        truncate_metrics(config.output_dir, start_step)
    else:  # a fresh run: an earlier run's metrics, checkpoints and final model move aside, kept
        archived = archive_earlier_run(Path(config.output_dir))
        if archived is not None:
            print(f"{config.output_dir} held an earlier run: moved to {archived}")
    output_dir = prepare_output_dir(config)
    return StageSetup(output_dir, model_path, tokenizer, checkpoints, resume_from, start_step)


@dataclass(frozen=True)
class StageRun:
    """A running stage: its tracker, and ``on_exit`` to register what must be released at the end."""

    tracker: Tracker
    cleanup: contextlib.ExitStack

    def on_exit(self, release: Callable[[], Any]) -> None:
        """Call ``release`` when the stage ends, also on failure (last registered, first released)."""
        self.cleanup.callback(release)


@contextlib.contextmanager
def stage_run(config, setup: StageSetup, *, roles: dict[str, tuple[float, float]], total_steps: int,
              description: str) -> Iterator[StageRun]:
    """The stage set-up every stage family shares: the Ray session (embedded or joined), the check that
    the roles fit the cluster, the tracker; on exit everything registered with ``on_exit`` is released
    in reverse order (each step runs even if an earlier one raised), then the tracker closes."""
    with ray_session(config.ray):
        check_cluster_resources(config.ray, roles)
        with contextlib.ExitStack() as cleanup:
            tracker = Tracker(setup.output_dir, config=config_to_dict(config), wandb=config.tracking.wandb,
                              total_steps=total_steps, start_step=setup.start_step,
                              progress=config.tracking.progress, description=description)
            cleanup.callback(tracker.close)
            yield StageRun(tracker, cleanup)


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
    completions = trainers.generate(eval_set.prompt_ids, max_new_tokens=max_new_tokens,
                                    pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(tokenizer))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return exact_match_accuracy(texts, eval_set.answers)


def run_training_steps(config, setup: StageSetup, trainers, tracker, *, total_steps: int, batcher,
                       train_step: Callable[[list], tuple[dict[str, Any], int]],
                       evaluate: Callable[[], dict[str, float]] | None, data_stats) -> tuple[Path, dict[str, float]]:
    """The loop every single-actor stage (SFT, RM, DPO) shares; returns (final model dir, last eval).

    Resume (or log the data counts), evaluate at the start, then per step: the batcher's global batch
    -> ``train_step(batches)`` -> ``(metrics, num_tokens)`` -> log, eval and checkpoint on their
    schedules; at the end the final model in Hugging Face format."""
    if setup.resume_from:
        trainers.load_checkpoint(str(setup.resume_from))
        tracker.write(f"resumed from {setup.resume_from} (step {setup.start_step})")
    else:
        tracker.log(0, {"data/rows": data_stats.rows, "data/truncated": data_stats.truncated,
                        "data/dropped": data_stats.dropped, "total_steps": total_steps})
    if evaluate is not None and config.eval.at_start and setup.start_step == 0:
        tracker.log(0, evaluate())

    final_eval: dict[str, float] = {}
    for step in range(setup.start_step, total_steps):
        step_start = time.perf_counter()
        batches = batcher.step_batches(step)
        data_s = time.perf_counter() - step_start
        metrics, num_tokens = train_step(batches)
        elapsed = time.perf_counter() - step_start
        metrics.update(tokens_per_s=num_tokens / elapsed, num_tokens=num_tokens, epoch=batcher.epoch_of(step + 1),
                       step_s=elapsed, **{"time/data": data_s})
        tracker.log(step + 1, metrics)
        tracker.advance()

        done = step + 1
        if evaluate is not None and eval_due(config, done, total_steps):
            final_eval = evaluate()
            tracker.log(done, final_eval)
        if checkpoint_due(config, done, total_steps):
            setup.checkpoints.save(done, lambda d: trainers.save_checkpoint(str(d)), {"total_steps": total_steps})
    return export_final_model(trainers, setup.tokenizer, setup.output_dir), final_eval
