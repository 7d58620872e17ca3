"""RL packing (``train.packing``): the policy trainer's tokens/s padded vs packed, side by side in one run.

One real DeepSpeed rank (``PolicyTrainer``, in this process, ``--threads`` threads) on a Llama from
``rayrl init-model --hidden-size H --num-layers L``, a GRPO-sized batch: ``--sequences`` prompts of 8-12
tokens with completions of uniformly mixed lengths (``--min-new`` to ``--max-new`` tokens), advantages
drawn at random. Each layout runs the loop's own phase-5 code (``rl.train_on_rollout``: one on-policy
optimizer step over the batch, shuffled, split into micro-batches) and the log-prob pass
(``token_logprobs`` over ``RowShards``, as ``roles.policy_logprobs``):

- padded, ``micro_batch_size`` rows per micro-batch, each cut to its longest row;
- packed, ``train.packing: true`` with the default token budget (``micro_batch_size`` x the longest
  sequence): the same forwards laid out without padding.

Tokens/s counts real (prompt + completion) tokens. Medians over the steps after the first.

Run:  python benchmarks/packing.py [--steps 5] [--out benchmarks/results/packing.md]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from recorded import heading, publish  # benchmarks/recorded.py


def rollout_batch(sequences: int, min_new: int, max_new: int, vocab: int, seed: int = 0):
    from rayrl.data.rollout import RolloutBatch, completion_tokens

    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(5, vocab, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [draw(int(torch.randint(8, 13, (1,), generator=generator))) for _ in range(sequences)]
    completions = [draw(int(torch.randint(min_new, max_new + 1, (1,), generator=generator))) for _ in range(sequences)]
    tokens, sampler = completion_tokens(prompts, completions, [[0.0] * len(c) for c in completions], pad_id=0)
    advantages = torch.randn(sequences, generator=generator)
    return RolloutBatch(tokens, advantages, None, sampler, None, torch.zeros(sequences, dtype=torch.bool))


class OneRankGroup:
    """The group interface ``train_on_rollout`` calls, over one in-process rank (no Ray: the trainer's
    own time is what is measured)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def start_policy_gradient_step(self, per_rank, **kwargs):
        metrics = self.trainer.train_policy_gradient_step(per_rank[0], **kwargs)
        return SimpleNamespace(wait=lambda: metrics)


def start_trainer(model_path: str, packing: bool, micro: int, grad_accum_steps: int, threads: int, steps: int):
    from rayrl.actors.engine import TrainerSpec
    from rayrl.actors.policy_trainer import PolicyTrainer

    spec = TrainerSpec(model_path=model_path, world_size=1, micro_batch_size=micro, grad_accum_steps=grad_accum_steps,
                       total_steps=steps, lr=1e-5, lr_schedule="constant", num_threads=threads, packing=packing)
    trainer = PolicyTrainer(spec, rank=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    trainer.setup("127.0.0.1", port, 0, 1)
    return trainer


def measure(model_path: str, batch, *, packing: bool, micro: int, budget: int | None, threads: int,
            steps: int) -> dict[str, float]:
    from rayrl.data.batch import RowShards
    from rayrl.objectives import PolicyGradientObjective
    from rayrl.rl import MicroBatching, UpdatePlan, train_on_rollout

    count = batch.num_examples
    trainer = start_trainer(model_path, packing, micro, count // micro, threads, steps)
    group = OneRankGroup(trainer)
    plan = UpdatePlan(1, 1, count, 1, MicroBatching(micro, budget), seed=0)
    tokens = batch.tokens.num_tokens
    train_s, logprob_s = [], []
    for step in range(steps):
        start = time.perf_counter()
        train_on_rollout(plan, group, PolicyGradientObjective(), batch, step)
        train_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.token_logprobs(RowShards.split(batch.tokens, 1, micro).micro_batches(0))
        logprob_s.append(time.perf_counter() - start)
    trainer.shutdown()
    train, logprob = statistics.median(train_s[1:]), statistics.median(logprob_s[1:])
    return {"train_s": train, "train_tok_s": tokens / train, "logprob_s": logprob, "logprob_tok_s": tokens / logprob}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--min-new", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from rayrl.tiny import init_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(init_model(Path(tmp) / "model", hidden_size=args.hidden_size, num_layers=args.num_layers))
        batch = rollout_batch(args.sequences, args.min_new, args.max_new, vocab=100)
        longest = int(batch.tokens.row_lengths().max())
        lengths = batch.tokens.row_lengths().float()
        layouts = {
            f"padded, {args.micro} rows per micro-batch": dict(packing=False, micro=args.micro, budget=None),
            f"packed, {args.micro * longest} tokens per micro-batch": dict(packing=True, micro=args.micro,
                                                                           budget=args.micro * longest),
        }
        results = {}
        for name, layout in layouts.items():  # each in a fresh process: one DeepSpeed engine per process
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                results[name] = pool.apply(measure, (model_path, batch),
                                           dict(threads=args.threads, steps=args.steps, **layout))
    lines = [heading(), "",
             f"Llama {args.hidden_size}x{args.num_layers} (`rayrl init-model --hidden-size {args.hidden_size} "
             f"--num-layers {args.num_layers}`), one DeepSpeed rank, {args.threads} threads; {args.sequences} "
             f"sequences of {int(lengths.min())}-{longest} tokens (mean {lengths.mean():.1f}; completions "
             f"{args.min_new}-{args.max_new}). Median of {args.steps - 1} steps after the first.", "",
             "| layout | train step s | train tokens/s | log-prob pass s | log-prob tokens/s |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['train_s']:.2f} | {r['train_tok_s']:.0f} | {r['logprob_s']:.2f} | "
                     f"{r['logprob_tok_s']:.0f} |")
    padded, packed = results.values()
    lines += ["", f"Packed / padded tokens/s: train {packed['train_tok_s'] / padded['train_tok_s']:.2f}x, "
                  f"log-prob pass {packed['logprob_tok_s'] / padded['logprob_tok_s']:.2f}x.", ""]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
