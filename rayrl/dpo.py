"""The DPO family as a single-actor stage: DPO (sigmoid), IPO, hinge, robust / cDPO, SimPO, ORPO, KTO.

Reference log-probs: with ``dpo.reference: precompute`` one pass over the data before the first step
scores every response with the starting weights (or, with PEFT, the adapter-disabled base) and keeps
the numbers, so no reference weights stay in memory; they are saved in the output dir so a resumed
run uses the same ones. With ``alongside`` they are computed every step: from a frozen copy of the
starting weights, or with PEFT from the base with the adapter disabled (no second copy).

Run:  rayrl train examples/dpo.yaml [key=value ...]
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rayrl.cluster import trainer_roles
from rayrl.config import DPOConfig
from rayrl.data.batch import collate
from rayrl.data.batching import StepBatcher, steps_for_epochs
from rayrl.data.loading import DataError
from rayrl.data.preference import (PreferencePair, collate_pairs, collate_unpaired,
                                   load_kto_examples, load_preference_pairs, pair_token_rows)
from rayrl.objectives import PreferenceObjective
from rayrl.stage_common import (StageResult, generation_accuracy, load_generation_eval, prepare_stage,
                                run_training_steps, stage_run, trainer_spec)
from rayrl.trainer_group import PolicyTrainerGroup

REFERENCE_FILE = "reference_logps.json"
KTO_IMBALANCE_WARNING = 4.0  # warn when one label outnumbers the other (after weights) by more than this


def load_items(config: DPOConfig, source: str, tokenizer):
    if config.dpo.loss_type == "kto":
        return load_kto_examples(source, tokenizer, config.data.max_length)
    return load_preference_pairs(source, tokenizer, config.data.max_length)


def kto_balance_warning(config: DPOConfig, desirable: int, total: int) -> str | None:
    """KTO's paper: keep w_d * n_d / (w_u * n_u) within [1, 4/3]; far outside it, say so."""
    undesirable = total - desirable
    if desirable == 0 or undesirable == 0:
        raise DataError(f"KTO needs both desirable and undesirable rows; {config.data.train} has "
                        f"{desirable} desirable and {undesirable} undesirable")
    ratio = (config.dpo.kto_desirable_weight * desirable) / (config.dpo.kto_undesirable_weight * undesirable)
    if ratio > KTO_IMBALANCE_WARNING or ratio < 1 / KTO_IMBALANCE_WARNING:
        return (f"KTO labels are imbalanced: {desirable} desirable vs {undesirable} undesirable "
                f"(weighted ratio {ratio:.2f}); consider dpo.kto_desirable_weight / kto_undesirable_weight "
                "so that w_d*n_d / (w_u*n_u) lies in [1, 4/3]")
    return None


def token_rows(item) -> list:
    """The token rows whose reference log-probs an item needs."""
    if isinstance(item, PreferencePair):
        return pair_token_rows([item])
    rows = []
    for response in (item.completion_ids, list(item.mismatched_ids)):
        ids = item.prompt_ids + list(response)
        rows.append((ids, [False] * len(item.prompt_ids) + [True] * len(response), list(range(len(ids))), [1] * len(ids)))
    return rows


def with_reference(item, values: list[float]):
    if isinstance(item, PreferencePair):
        return replace(item, ref_chosen=values[0], ref_rejected=values[1])
    return replace(item, ref=values[0], ref_mismatched=values[1])


PRECOMPUTE_BATCHES_PER_RANK = 16


def precompute_reference(trainers: PolicyTrainerGroup, items: list, pad_id: int, batch_rows: int) -> list[list[float]]:
    """Reference log-probs of every item's two rows, in one no-grad pass."""
    rows = [row for item in items for row in token_rows(item)]
    batches = [collate(rows[start:start + batch_rows], pad_id) for start in range(0, len(rows), batch_rows)]
    # Calls of PRECOMPUTE_BATCHES_PER_RANK micro-batches per rank: each call stays well inside its deadline.
    per_call = PRECOMPUTE_BATCHES_PER_RANK * trainers.world_size
    values = [v for start in range(0, len(batches), per_call)
              for v in trainers.sequence_logprobs(batches[start:start + per_call], reference=True).tolist()]
    return [values[i:i + 2] for i in range(0, len(values), 2)]


def reference_logps(trainers: PolicyTrainerGroup, output_dir: Path, train: list, evals: list, pad_id: int, batch_rows: int,
                    resuming: bool) -> tuple[list, list]:
    path = output_dir / REFERENCE_FILE
    if resuming:
        if not path.exists():
            raise FileNotFoundError(f"cannot resume: {path} (the precomputed reference log-probs) is missing")
        saved = json.loads(path.read_text())
    else:
        saved = {"train": precompute_reference(trainers, train, pad_id, batch_rows),
                 "eval": precompute_reference(trainers, evals, pad_id, batch_rows)}
        path.write_text(json.dumps(saved))
    return ([with_reference(i, v) for i, v in zip(train, saved["train"], strict=True)],
            [with_reference(i, v) for i, v in zip(evals, saved["eval"], strict=True)])


def run_dpo(config: DPOConfig) -> StageResult:
    started = time.perf_counter()
    setup = prepare_stage(config)
    tokenizer = setup.tokenizer
    pad_id = tokenizer.pad_token_id
    objective = PreferenceObjective.from_settings(config.dpo)
    kto = config.dpo.loss_type == "kto"

    # 1. Data: preference pairs (or KTO rows), eval pairs, and prompts for task accuracy.
    train_items, data_stats = load_items(config, config.data.train, tokenizer)
    eval_items = load_items(config, config.data.eval, tokenizer)[0][: config.eval.max_examples] if config.data.eval else []
    generation_set = (load_generation_eval(config.eval.generation_data, tokenizer, config.eval.max_examples)
                      if config.eval.generation_data else None)
    warning = kto_balance_warning(config, data_stats.desirable, data_stats.examples) if kto else None
    collate_items = collate_unpaired if kto else collate_pairs

    separate_reference = (objective.needs_reference and config.dpo.reference == "alongside"
                          and config.model.peft is None)
    total_steps = config.train.max_steps or steps_for_epochs(len(train_items), config.train.epochs,
                                                             config.train.global_batch_size)
    with stage_run(config, setup, roles=trainer_roles(config), total_steps=total_steps,
                   description=config.dpo.loss_type) as run:
        # 2. The policy group (plus, for "alongside" without PEFT, a frozen reference copy per rank).
        trainers = PolicyTrainerGroup(trainer_spec(config, setup.model_path, total_steps),
                                      num_cpus=config.trainer.num_cpus, num_gpus=config.trainer.num_gpus,
                                      resources=config.trainer.resources, separate_reference=separate_reference,
                                      timeouts=config.fault.timeouts)
        run.on_exit(trainers.shutdown)
        tracker = run.tracker
        if warning:
            tracker.write(f"warning: {warning}")
        # 3. Reference log-probs, once, before any weight changes (or loaded when resuming).
        if objective.needs_reference and config.dpo.reference == "precompute":
            ref_start = time.perf_counter()
            train_items, eval_items = reference_logps(
                trainers, setup.output_dir, train_items, eval_items, pad_id,
                2 * config.train.micro_batch_size, resuming=setup.resume_from is not None)
            tracker.write(f"reference log-probs ready in {time.perf_counter() - ref_start:.1f}s")
        batcher = StepBatcher(train_items, global_batch_size=config.train.global_batch_size,
                              micro_batch_size=config.train.micro_batch_size,
                              world_size=config.trainer.world_size, seed=config.seed,
                              shuffle=config.data.shuffle, collate=lambda items: collate_items(items, pad_id),
                              unit="rows" if kto else "pairs")

        def evaluate() -> dict[str, float]:
            metrics: dict[str, float] = {}
            if eval_items:
                size = config.train.micro_batch_size
                batches = [collate_items(eval_items[i:i + size], pad_id) for i in range(0, len(eval_items), size)]
                stats = trainers.eval_preference(batches, objective)
                metrics.update({f"eval/{k}": v for k, v in stats.items()})
            if generation_set is not None:
                metrics["eval/accuracy"] = generation_accuracy(trainers, generation_set, tokenizer,
                                                               config.eval.max_new_tokens)
            return metrics

        def train_step(batches) -> tuple[dict[str, Any], int]:
            metrics = trainers.train_preference_step(batches, global_num_examples=config.train.global_batch_size,
                                                     objective=objective)
            return metrics, sum(b.tokens.num_tokens for rank in batches for b in rank)

        # 4. One optimizer step per global batch of pairs (or KTO rows); eval, checkpoints; the final
        # model (merged and/or adapter with PEFT) in Hugging Face format.
        final_model, final_eval = run_training_steps(
            config, setup, trainers, tracker, total_steps=total_steps, batcher=batcher, train_step=train_step,
            evaluate=evaluate, data_stats=data_stats)
    return StageResult(setup.output_dir, final_model, final_eval, total_steps, time.perf_counter() - started)
