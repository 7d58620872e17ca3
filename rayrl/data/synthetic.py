"""The built-in synthetic task: two-digit addition, "37+45=" -> "82".

The SFT demonstrations carry a deliberate flaw: when the units digits sum to 12 or more (28% of the
inputs) the demo forgets the carry and answers ten too little. A model that imitates the demos
perfectly therefore tops out near 72% held-out accuracy, leaving room for preference optimisation and
RL with a verifier (the ``answer`` field always holds the true sum) to show a gain.

Built-in names (used in configs as ``data.train: rayrl:addition/sft-train``; resolved by
:func:`rayrl.data.loading.resolve_dataset_path`):
  addition/sft-train, addition/sft-eval   prompt, completion (the demo), answer (the true sum)
  addition/prompts-train, addition/prompts-eval   prompt, answer (for RL with a verifier)
  addition/prefs-train, addition/prefs-eval   prompt, chosen (the true sum), rejected, answer
  addition/kto-train, addition/kto-eval   prompt, completion, label (each preference pair unpaired)

Preference pairs cover every prompt: where the demo is wrong, rejected = the demo's mistake; where it
is right, rejected = a near miss (off by 1 or 10). Pairs built only from the mistakes teach a
prompt-blind rule ("add 10") instead of the carry.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rayrl.tiny import atomic_build, cache_dir

TASK = "addition"

SPLITS = ("sft-train", "sft-eval", "prompts-train", "prompts-eval", "prefs-train", "prefs-eval",
          "kto-train", "kto-eval")
NUM_EVAL = 500


def demo_answer(a: int, b: int) -> int:
    """The flawed demonstrator: drops the units carry when the units digits sum to 12 or more."""
    total = a + b
    return total - 10 if (a % 10 + b % 10) >= 12 else total


def addition_pairs(seed: int = 1234) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All 8,100 two-digit pairs, split into train and a held-out eval set (disjoint)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[NUM_EVAL:], pairs[:NUM_EVAL]


def addition_rows(split: str) -> list[dict]:
    train, held_out = addition_pairs()
    pairs = train if split.endswith("train") else held_out
    if split.startswith(("prefs", "kto")):
        return preference_rows(pairs, unpaired=split.startswith("kto"))
    rows = []
    for a, b in pairs:
        row = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        if split.startswith("sft"):
            row["completion"] = str(demo_answer(a, b))
        rows.append(row)
    return rows


def preference_rows(pairs: list[tuple[int, int]], *, unpaired: bool, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for a, b in pairs:
        true, demo = a + b, demo_answer(a, b)
        rejected = demo if demo != true else true + rng.choice([-10, -1, 1, 10])
        prompt = f"{a}+{b}="
        if unpaired:
            rows.append({"prompt": prompt, "completion": str(true), "label": True, "answer": str(true)})
            rows.append({"prompt": prompt, "completion": str(rejected), "label": False, "answer": str(true)})
        else:
            rows.append({"prompt": prompt, "chosen": str(true), "rejected": str(rejected), "answer": str(true)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_splits(directory: Path) -> None:
    """Every split as ``directory/<split>.jsonl``."""
    for split in SPLITS:
        write_jsonl(addition_rows(split), directory / f"{split}.jsonl")


def cached_split(split: str) -> Path:
    """The JSONL file of one split (one of :data:`SPLITS`) in the cache; all splits are written on first use."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the addition task; splits: {', '.join(SPLITS)}")
    # The directory carries a version: a change to the task must not reuse old files.
    target = atomic_build(cache_dir() / "data" / f"{TASK}-v2", write_splits)
    return target / f"{split}.jsonl"
