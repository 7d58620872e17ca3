"""The ``rayrl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rayrl.config import ConfigError, load_config
from rayrl.data.loading import DataError

from rayrl.rewards.registry import RewardSpecError

USER_ERRORS = (ConfigError, DataError, RewardSpecError, FileNotFoundError)

DESCRIPTION = """\
rayrl: LLM post-training (SFT, preference optimisation, RL with verifiable rewards) on Ray.

Each stage runs from one YAML config; any key can be overridden on the command line with a dotted
key=value pair, e.g.  rayrl train examples/sft.yaml train.lr=1e-4 output_dir=runs/try2
"""


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from rayrl.stages import run_stage

    result = run_stage(config)
    summary = {"output_dir": str(result.output_dir), "final_model": str(result.final_model),
               "steps": result.steps, "wall_s": round(result.wall_s, 1), **result.final_eval}
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from rayrl.pipeline import run_pipeline

    summary = run_pipeline(args.pipeline, args.overrides)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_init_model(args: argparse.Namespace) -> int:
    from rayrl.tiny import init_model

    path = init_model(args.directory, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"wrote a tiny Llama-architecture model and tokenizer to {path}")
    return 0


def _cmd_make_data(args: argparse.Namespace) -> int:
    from rayrl.data.synthetic import SPLITS, addition_rows, write_jsonl

    directory = Path(args.directory)
    for split in SPLITS:
        write_jsonl(addition_rows(split), directory / f"{split}.jsonl")
    print(f"wrote {', '.join(s + '.jsonl' for s in SPLITS)} to {directory}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from rayrl.quickstart import run_quickstart

    run_quickstart(args.output_dir, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrl", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="run one stage from a YAML config",
        description="Run the stage a config names (its 'algorithm' key). Writes metrics.jsonl, "
                    "checkpoints and the final Hugging Face model into output_dir.")
    train.add_argument("config", help="stage config (YAML), e.g. examples/sft.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides, e.g. train.lr=1e-4 trainer.world_size=2 output_dir=runs/x")
    train.set_defaults(func=_cmd_train)

    pipe = commands.add_parser(
        "pipeline", help="chain stages (e.g. SFT -> DPO -> GRPO); finished stages are skipped on rerun",
        description="Run the stages a pipeline file lists, each stage's final model becoming the next "
                    "stage's model.path. Every stage config is validated first; completed stages are "
                    "not rerun.")
    pipe.add_argument("pipeline", help="pipeline file (YAML), e.g. examples/pipeline.yaml")
    pipe.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every stage")
    pipe.set_defaults(func=_cmd_pipeline)

    init = commands.add_parser(
        "init-model", help="write a tiny random-weight causal LM and tokenizer (for tests and demos)",
        description="Write a tiny Llama-architecture causal LM with random weights and a local "
                    "character-level tokenizer with a chat template, in Hugging Face format.")
    init.add_argument("directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--hidden-size", type=int, default=128)
    init.add_argument("--num-layers", type=int, default=2)
    init.set_defaults(func=_cmd_init_model)

    data = commands.add_parser(
        "make-data", help="write the built-in synthetic addition task as JSONL files",
        description="Write the synthetic two-digit addition task (SFT demos with a deliberate carry "
                    "mistake, true answers, held-out splits) as JSONL files.")
    data.add_argument("directory")
    data.set_defaults(func=_cmd_make_data)

    quick = commands.add_parser(
        "quickstart", help="the main job: build a tiny model and task, post-train it, print a table",
        description="Build a tiny model and a synthetic verifiable task, post-train it on an embedded "
                    "Ray cluster, print a table (stage, held-out accuracy, wall time) and write "
                    "OUTPUT/summary.json.")
    quick.add_argument("--output-dir", default="runs/quickstart")
    quick.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every stage")
    quick.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"rayrl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
