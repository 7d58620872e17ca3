"""GRPO step time by phase, and orchestration overhead: rayrl's step against a plain single-process
implementation of the same step (same model, prompts, group size, new tokens, loss, optimizer).

  plain   one process: HF generate (sampling) -> math_answer in-process -> group advantages ->
          clipped policy-gradient loss (one optimizer step per batch: the training forward's own
          log-probs are the old ones, no separate pass), backward, AdamW -> (no sync needed)
  rayrl   the real stage: vLLM-CPU (or HF) rollout actor, verifier actor, DeepSpeed trainer actor,
          weight sync through the object store

Medians over steps after a warm-up. Both start from the same SFT checkpoint.

Run:  python benchmarks/grpo_step.py --model runs/sft/final [--steps 20] [--backend vllm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS, GROUP, NEW_TOKENS = 16, 8, 6


def plain(model_path: str, steps: int, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayrl.algorithms import group_advantages, policy_gradient_loss, token_logprobs
    from rayrl.data.rollout import completion_tokens, load_prompts
    from rayrl.rewards import math_answer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    prompts = load_prompts("rayrl:addition/prompts-train", tokenizer, 64)
    phases: dict[str, list[float]] = {k: [] for k in ("generate", "reward", "logprobs", "train", "step")}
    for step in range(steps):
        start = time.perf_counter()
        batch = prompts[step * PROMPTS:(step + 1) * PROMPTS]
        # 1. generate (left-padded, sampled, n per prompt)
        t = time.perf_counter()
        width = max(len(p.prompt_ids) for p in batch)
        ids = torch.full((PROMPTS, width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            attention[i, width - len(p.prompt_ids):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.repeat_interleave(GROUP, 0), attention_mask=attention.repeat_interleave(GROUP, 0),
                                 do_sample=True, temperature=1.0, top_k=0, max_new_tokens=NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id)
        completions = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, tok in enumerate(row) if tok in model.generation_config.eos_token_id), len(row))
            completions.append([tok for tok in row[:cut] if tok != tokenizer.pad_token_id] or row[:1])
        phases["generate"].append(time.perf_counter() - t)
        # 2. reward
        t = time.perf_counter()
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.tensor([math_answer(p.prompt, c, **p.fields) for p, c in
                                zip([p for p in batch for _ in range(GROUP)], texts)])
        phases["reward"].append(time.perf_counter() - t)
        # 3. old log-probs: one optimizer step per batch, so the training forward's own (no pass; as TRL)
        t = time.perf_counter()
        tokens, _ = completion_tokens([p.prompt_ids for p in batch for _ in range(GROUP)], completions,
                                      [[0.0] * len(c) for c in completions], tokenizer.pad_token_id)
        phases["logprobs"].append(time.perf_counter() - t)
        # 4-5. advantages and one optimizer step
        t = time.perf_counter()
        advantages = group_advantages(rewards, GROUP)
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.padding_mask()).logits
        logps = token_logprobs(logits[:, :-1], tokens.input_ids[:, 1:])
        loss, _ = policy_gradient_loss(logps, logps.detach(), advantages, tokens.loss_mask[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases["train"].append(time.perf_counter() - t)
        phases["step"].append(time.perf_counter() - start)
    return {k: statistics.median(v[3:]) for k, v in phases.items()}


def staged(model_path: str, steps: int, backend: str) -> dict[str, float]:
    from rayrl.config import build_config
    from rayrl.rl import run_rl
    from rayrl.tracking import read_metrics

    with tempfile.TemporaryDirectory() as out:
        config = build_config({
            "algorithm": "grpo", "output_dir": out, "model": {"path": model_path},
            "rollout": {"backend": backend, "num_cpus": 0.5, "group_size": GROUP, "max_new_tokens": NEW_TOKENS},
            "grpo": {"prompts_per_step": PROMPTS}, "train": {"max_steps": steps, "micro_batch_size": 128},
            "trainer": {"num_cpus": 1}, "verifier": {"num_cpus": 0.25}, "data": {"train": "rayrl:addition/prompts-train", "eval": None},
            "eval": {"at_start": False}, "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
        })
        run_rl(config)
        rows = [r for r in read_metrics(out) if "time/step" in r][3:]
    keys = {"generate": "time/generate", "reward": "time/reward", "logprobs": "time/reference",
            "train": "time/train", "sync": "time/sync", "step": "time/step"}
    return {name: statistics.median(r[key] for r in rows) for name, key in keys.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="an SFT checkpoint (e.g. runs/sft/final)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    args = parser.parse_args()
    base = plain(args.model, args.steps, args.threads)
    ours = staged(args.model, args.steps, args.backend)
    print(f"{PROMPTS} prompts x {GROUP} samples x <= {NEW_TOKENS} new tokens; medians over steps 4..{args.steps}")
    print(f"{'phase':<10} {'plain s':>9} {'rayrl s':>9}")
    for phase in ("generate", "reward", "logprobs", "train", "sync", "step"):
        print(f"{phase:<10} {base.get(phase, 0.0):>9.3f} {ours.get(phase, 0.0):>9.3f}")
    print(f"rayrl step / plain step = {ours['step'] / base['step']:.2f}")


if __name__ == "__main__":
    main()
