"""One Hugging Face TRL ``GRPOTrainer`` run, timed per step: the TRL half of ``benchmarks/trl_compare.py``.

Runs in the virtual environment that script makes for TRL. fp32, no gradient checkpointing, HF
generate, one optimizer step per generation batch (TRL then skips the separate old-log-prob pass),
no KL (beta 0), the partial-credit reward. Writes the step wall times (s) as JSON to ``--out``.

Run (by trl_compare.py):  TRL_PYTHON trl_grpo_run.py --model DIR --prompts FILE.jsonl --out times.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL rows with prompt and answer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(Path(__file__).parent))
    from partial_credit import partial_credit_batch

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], 0.0

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start)

    config = GRPOConfig(
        output_dir=str(Path(args.out).parent / "trl_run"), max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=args.prompts_per_step * args.group, num_generations=args.group,
        gradient_accumulation_steps=1, max_completion_length=args.new_tokens, temperature=1.0, beta=0.0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", lr_scheduler_type="constant", warmup_steps=0, seed=0, dataloader_num_workers=0)
    timer = StepTimes()
    trainer = GRPOTrainer(model=args.model, reward_funcs=partial_credit_batch, args=config, train_dataset=dataset,
                          callbacks=[timer])
    trainer.train()
    Path(args.out).write_text(json.dumps({"step_s": timer.times}))


if __name__ == "__main__":
    main()
