"""The ``rayrl`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rayrl import submit as sub
from rayrl.checkpoint import CheckpointError
from rayrl.config import ConfigError, load_config
from rayrl.data.loading import DataError
from rayrl.data.synthetic import SPLITS, write_splits
from rayrl.pipeline import run_pipeline
from rayrl.quickstart import run_quickstart
from rayrl.remote import RemoteCallTimeout, RoleFailed
from rayrl.report import render_report
from rayrl.rewards.registry import RewardSpecError
from rayrl.scaling import request_scale
from rayrl.stages import run_stage
from rayrl.tiny import init_model
from rayrl.tracking import TrainingDiverged

USER_ERRORS = (ConfigError, DataError, RewardSpecError, FileNotFoundError, CheckpointError)

DESCRIPTION = """\
rayrl: LLM post-training (SFT, preference optimisation, RL with verifiable rewards) on Ray.

Each stage runs from one YAML config; any key can be overridden on the command line with a dotted
key=value pair, e.g.  rayrl train examples/sft.yaml train.lr=1e-4 output_dir=runs/try2
"""


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    result = run_stage(config)
    summary = {"output_dir": str(result.output_dir), "final_model": str(result.final_model),
               "steps": result.steps, "wall_s": round(result.wall_s, 1), **result.final_eval}
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    summary = run_pipeline(args.pipeline, args.overrides)
    print(json.dumps(summary, indent=2))
    return 0


class UsageError(ValueError):
    """A command's argument that cannot work (the message says which and why)."""


def _cmd_init_model(args: argparse.Namespace) -> int:
    if Path(args.directory).exists() and not Path(args.directory).is_dir():
        raise UsageError(f"init-model: {args.directory} exists and is not a directory")
    path = init_model(args.directory, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"wrote a tiny Llama-architecture model and tokenizer to {path}")
    return 0


def _cmd_make_data(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    write_splits(directory)
    print(f"wrote {', '.join(s + '.jsonl' for s in SPLITS)} to {directory}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    run_quickstart(args.output_dir, overrides=args.overrides)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    try:
        # ConfigError from local validation propagates: the same one line as `rayrl train`.
        result = sub.submit(args.config, args.overrides, address=args.address, python=args.python,
                            env=args.env, job_id=args.job_id, keep_staged=args.keep_staged)
    except sub.SubmitError as exc:
        print(f"rayrl: error: {exc}", file=sys.stderr)
        return 2
    staged, jobs = result.staged, result.client
    print(f"submitted job {result.job_id} (output_dir {staged.config['output_dir']}; staged "
          f"{staged.bytes} bytes, {len(staged.files)} local file(s))", file=sys.stderr)
    print(result.job_id, flush=True)
    if not args.wait:
        return 0
    try:
        status = sub.wait(jobs, result.job_id)
    except KeyboardInterrupt:
        print(f"rayrl: stopped waiting; the job keeps running (rayrl jobs stop {result.job_id})", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"rayrl: error: lost the job server while waiting: {sub.one_line(exc)}", file=sys.stderr)
        return 1
    if status == "SUCCEEDED":
        print(f"job {result.job_id} SUCCEEDED", file=sys.stderr)
        return 0
    info = jobs.get_job_info(result.job_id)
    code = getattr(info, "driver_exit_code", None)
    print(f"rayrl: job {result.job_id} {status}" + (f" (exit code {code})" if code is not None else "")
          + (f": {sub.mask_secrets(info.message.splitlines()[0])}" if info.message else ""), file=sys.stderr)
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _cmd_jobs(args: argparse.Namespace) -> int:
    try:
        jobs = sub.client(args.address)
        if args.action == "list":
            rows = sorted((sub.job_summary(j) for j in jobs.list_jobs()), key=lambda r: r["start"] or "")
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in ([] if args.json else rows):
                print(f"{r['job_id']:<40} {r['status']:<10} {r['start'] or '-':<20} {r['entrypoint']}")
            return 0
        if not args.job_id:
            print(f"rayrl: error: jobs {args.action} needs a JOB_ID", file=sys.stderr)
            return 2
        if args.action == "status":
            print(json.dumps(sub.job_summary(jobs.get_job_info(args.job_id)), indent=2))
        elif args.action == "logs":
            if args.follow:
                status = sub.wait(jobs, args.job_id)
                return 0 if status == "SUCCEEDED" else 1
            sys.stdout.write(sub.mask_secrets(jobs.get_job_logs(args.job_id)))
        elif args.action == "stop":
            stopped = jobs.stop_job(args.job_id)
            print(f"job {args.job_id}: " + ("stop requested" if stopped else "already finished"))
        return 0
    except sub.SubmitError as exc:
        print(f"rayrl: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the SDK's "job does not exist" and HTTP errors
        print(f"rayrl: error: {sub.one_line(exc)}", file=sys.stderr)
        return 2


def _cmd_scale(args: argparse.Namespace) -> int:
    output_dir = args.output_dir
    if args.address is None:
        count = request_scale(output_dir, args.overrides)
    else:  # written on the cluster's side, where the run's output_dir is
        try:
            output_dir, count = sub.request_scale_on_cluster(args.output_dir, args.overrides, address=args.address,
                                                             python=args.python)
        except sub.SubmitError as exc:
            print(f"rayrl: error: {exc}", file=sys.stderr)
            return 2
    print(f"asked the run in {output_dir} for {count} rollout workers; it takes the request between "
          "steps (watch rollout/num_workers in metrics.jsonl)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    if not Path(args.output_dir).is_dir():
        raise UsageError(f"report: {args.output_dir} is not a run's output directory")
    paths = render_report(args.output_dir, destination=args.to)
    for path in paths:
        print(path)
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

    submit_cmd = commands.add_parser(
        "submit", help="run a stage on a Ray cluster as a Ray job (validated here first)",
        description="Validate a stage config here, stage it with the local files it names (datasets, "
                    "reward .py files) as the job's working_dir, and submit `python -m rayrl.cli train` "
                    "as a Ray job. The Ray auth token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                    "or ~/.ray/auth_token; WANDB_API_KEY travels in the job's env_vars only. "
                    "output_dir (and a local model.path) must be on storage the cluster shares.")
    submit_cmd.add_argument("config", help="stage config (YAML), e.g. examples/sft.yaml")
    submit_cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")
    submit_cmd.add_argument("--address", default=None,
                            help="the Ray dashboard / job server, e.g. http://127.0.0.1:8265 (default $RAY_ADDRESS)")
    submit_cmd.add_argument("--wait", action="store_true",
                            help="stream the job's logs; exit 0 only if it SUCCEEDED")
    submit_cmd.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                            help="extra env var for the job (KEY alone copies it from this shell); repeatable")
    submit_cmd.add_argument("--python", default="python", help="the cluster's python with rayrl installed")
    submit_cmd.add_argument("--job-id", default=None, help="submission id (default rayrl-ALGO-TIME-RANDOM)")
    submit_cmd.add_argument("--keep-staged", default=None, metavar="DIR",
                            help="stage into DIR and keep it (default: a temp dir removed after upload)")
    submit_cmd.set_defaults(func=_cmd_submit)

    jobs = commands.add_parser(
        "jobs", help="list / inspect / follow / stop Ray jobs (wraps the Job Submission SDK)",
        description="list: all jobs; status ID: state, exit code, metadata (secrets redacted); logs ID "
                    "[--follow]: the driver log; stop ID: stop a running job.")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", metavar="JOB_ID")
    jobs.add_argument("--address", default=None, help="e.g. http://127.0.0.1:8265 (default $RAY_ADDRESS)")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jobs.add_argument("--json", action="store_true", help="list: JSON output")
    jobs.set_defaults(func=_cmd_jobs)

    scale = commands.add_parser(
        "scale", help="grow or shrink a running RL run's rollout workers: rayrl scale OUTPUT_DIR rollout.num_workers=N",
        description="Ask the RL run writing to OUTPUT_DIR (on an embedded cluster, or a submitted job whose "
                    "output_dir this machine shares) to run N rollout workers. With --address the request is "
                    "written on the cluster's side by a short job (OUTPUT_DIR as the cluster sees it, or the "
                    "JOB_ID `rayrl submit` printed). The run takes the request between steps; new workers "
                    "get the current weights before their first request.")
    scale.add_argument("output_dir", metavar="OUTPUT_DIR|JOB_ID")
    scale.add_argument("overrides", nargs="+", metavar="rollout.num_workers=N")
    scale.add_argument("--address", default=None,
                       help="the cluster's job server, e.g. http://127.0.0.1:8265: write the request there")
    scale.add_argument("--python", default="python", help="with --address: the cluster's interpreter (rayrl installed)")
    scale.set_defaults(func=_cmd_scale)

    report = commands.add_parser(
        "report", help="render a run's metrics.jsonl to PNG curves and an HTML page (no W&B needed)",
        description="Plot every numeric metric family in OUTPUT_DIR/metrics.jsonl (loss, lr, reward/*, "
                    "eval/*, ...) to PNG files and write index.html listing them, in OUTPUT_DIR/report.")
    report.add_argument("output_dir")
    report.add_argument("--to", default=None, metavar="DIR", help="write there instead of OUTPUT_DIR/report")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (*USER_ERRORS, UsageError) as exc:
        print(f"rayrl: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RemoteCallTimeout, RoleFailed) as exc:
        print(f"rayrl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rayrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
