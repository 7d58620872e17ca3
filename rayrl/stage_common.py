"""What every stage family (SFT, RM, DPO, RL) shares: the trainer spec from a config, the stage set-up
(output dir, tokenizer, resume point; Ray session, resource check, tracker, cleanup), the step loop
of the single-actor stages, schedules and generation eval."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrl.actors.engine import TrainerSpec
from rayrl.checkpoint import CheckpointManager
from rayrl.cluster import check_cluster_resources, ray_session
from rayrl.config import ConfigError, config_to_dict
from rayrl.data.loading import DataError, read_rows, require_field
from rayrl.evaluation import exact_match_accuracy
from rayrl.outputs import archive_earlier_run, export_final_model, prepare_output_dir
from rayrl.remote import first_line
from rayrl.tiny import resolve_model_path
from rayrl.tracking import Tracker, check_finite_training, truncate_metrics


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
    """Model path and tokenizer, and where to resume from (if asked and possible): all checked, nothing
    written. The output dir is only claimed (:func:`claim_output_dir`, by :func:`stage_run`) once the
    data, the reward specs, the cluster and its resources have been checked too."""
    check_output_dir(config.output_dir)
    model_path = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(config.model.path, model_path)
    checkpoints = CheckpointManager(Path(config.output_dir) / "checkpoints", config.checkpoint.keep_last)
    resume_from, start_step = None, 0
    if config.checkpoint.resume:
        resume_from, skipped = checkpoints.latest_intact()
        for bad in skipped:
            print(f"checkpoint {bad.path.name} is damaged ({bad.reason}): "
                  + (f"resuming from {resume_from.name} instead" if resume_from else "not using it"))
        if resume_from is None and skipped:
            raise ConfigError(f"checkpoint.resume: no intact checkpoint in {checkpoints.root} "
                              f"({len(skipped)} damaged; newest: {skipped[0].reason})")
        start_step = CheckpointManager.load_state(resume_from)["step"] if resume_from else 0
    return StageSetup(Path(config.output_dir), model_path, tokenizer, checkpoints, resume_from, start_step)


def check_output_dir(output_dir: str | Path) -> None:
    """``output_dir`` must be a directory, or creatable as one, and writable."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir: {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir: {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {path} cannot be written: no write permission on {existing}")


def load_tokenizer(configured: str, model_path: str):
    """The tokenizer of ``model.path`` (pad token = eos where it has none); a :class:`ConfigError`
    naming ``model.path`` and what is wrong with it where the model cannot be loaded."""
    check_model_path(configured, model_path)
    from transformers import AutoTokenizer  # slow import (transformers)

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"model.path: the tokenizer of {configured!r} cannot be loaded: {first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_path(configured: str, model_path: str) -> None:
    """A local model directory must hold a readable ``config.json``; a hub name must be in the local
    cache or reachable (transformers' own error is then reduced to one line)."""
    from transformers import AutoConfig  # slow import (transformers)

    path = Path(os.path.expanduser(model_path))
    local = path.exists() or model_path.startswith(("/", ".", "~")) or model_path.count("/") > 1
    if local:
        if not path.exists():
            raise ConfigError(f"model.path: no such directory: {model_path}")
        if not path.is_dir():
            raise ConfigError(f"model.path: {model_path} is a file; a Hugging Face model directory is expected")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model.path: {model_path} has no config.json (not a Hugging Face model directory)")
        try:
            json.loads(config_file.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"model.path: {config_file}: not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"model.path: {config_file}:{error.lineno}: not valid JSON ({error.msg})") from None
    try:
        AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as error:
        where = "" if local else " (not a local directory; a hub name needs network access or the local cache)"
        raise ConfigError(f"model.path: {configured!r} cannot be loaded{where}: {first_line(error)}") from None


def claim_output_dir(config, setup: StageSetup) -> None:
    """Take ``output_dir`` for this run, once everything that can be checked has been: a fresh run moves
    an earlier run's records aside (kept under ``earlier_runs/``); then the resolved config is written.
    A resumed run's records after its checkpoint are cut once that checkpoint has loaded
    (:func:`records_resumed_at`)."""
    if setup.resume_from is None:
        archived = archive_earlier_run(Path(config.output_dir))
        if archived is not None:
            print(f"{config.output_dir} held an earlier run: moved to {archived}")
    prepare_output_dir(config)


def records_resumed_at(config, step: int) -> None:
    """After a checkpoint of ``step`` loaded: drop the metrics and samples logged after it, so the
    resumed run does not log those steps twice."""
    truncate_metrics(config.output_dir, step)


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
        claim_output_dir(config, setup)
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
        records_resumed_at(config, setup.start_step)
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
        check_finite_training(step + 1, metrics, setup.checkpoints)
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
