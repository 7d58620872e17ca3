import json

import pytest
import torch

from rayrl.data.batch import collate
from rayrl.data.loading import DataError, Row, read_rows
from rayrl.data.sft import load_sft_examples, sft_step_batcher, pack_rows, tokenize_sft_row


def test_prompt_completion_mask_token_by_token(tokenizer):
    example = tokenize_sft_row(Row({"prompt": "1+2=", "completion": "3"}, "x:1"), tokenizer, max_length=32)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    assert tokens == ["1", "+", "2", "=", "3", "<eos>"]
    assert example.loss_mask == [False, False, False, False, True, True]
    assert example.prompt_ids == tokenizer("1+2=")["input_ids"]
    assert example.answer == "3"


def test_messages_mask_only_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"},
                {"role": "assistant", "content": "ef"}]
    example = tokenize_sft_row(Row({"messages": messages}, "x:1"), tokenizer, max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    assert tokens == ["<|system|>", "s", "<|end|>", "<|user|>", "a", "b", "<|end|>", "<|assistant|>", "c",
                      "<|end|>", "<|user|>", "d", "<|end|>", "<|assistant|>", "e", "f", "<|end|>"]
    trained = [t for t, m in zip(tokens, example.loss_mask) if m]
    assert trained == ["c", "<|end|>", "e", "f", "<|end|>"]
    # the role marker that opens an assistant turn is part of the prompt, not a target
    assert example.loss_mask[7] is False and example.loss_mask[13] is False


def test_truncation_policy(tokenizer):
    row = Row({"prompt": "12345", "completion": "678"}, "x:1")
    cut = tokenize_sft_row(row, tokenizer, max_length=7)
    assert tokenizer.convert_ids_to_tokens(cut.input_ids) == list("1234567")
    assert cut.truncated and cut.loss_mask == [False] * 5 + [True, True]
    assert tokenize_sft_row(row, tokenizer, max_length=5) is None  # nothing left to learn: dropped


def test_dataset_stats_count_truncated_and_dropped(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "1", "completion": "2"}, {"prompt": "1234", "completion": "56"}, {"prompt": "123456", "completion": "7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = load_sft_examples(str(path), tokenizer, max_length=5)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 1, 1)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ":2: missing field 'completion'"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 3}\n', ":3: field 'completion' must be str, got int"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": \n', ":2: not valid JSON"),
    ('{"text": "a"}\n', ":1: missing field 'prompt'/'completion' or 'messages'"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', ":1: field 'messages' has no assistant turn"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_sft_examples(str(path), tokenizer, max_length=16)
    assert f"{path}{message}" in str(err.value)


def test_json_list_and_parquet_are_read(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert [r.fields for r in read_rows(str(tmp_path / "d.json"))] == rows
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    parquet = read_rows(str(tmp_path / "d.parquet"))
    assert [r.fields for r in parquet] == rows and parquet[1].where.endswith("d.parquet[1]")


def test_packing_boundaries(tokenizer):
    examples, _ = load_sft_examples("rayrl:addition/sft-train", tokenizer, max_length=16)
    first = examples[:5]
    lengths = [len(e.input_ids) for e in first]
    rows = pack_rows(first, max_length=2 * max(lengths))
    ids, mask, pos, seg = rows[0]
    n0, n1 = lengths[0], lengths[1]
    assert ids[:n0 + n1] == first[0].input_ids + first[1].input_ids
    assert pos[:n0 + n1] == list(range(n0)) + list(range(n1))  # positions restart per example
    assert seg[:n0 + n1] == [1] * n0 + [2] * n1
    assert all(len(r[0]) <= 2 * max(lengths) for r in rows)
    assert sum(len(r[0]) for r in rows) == sum(lengths)  # nothing lost or duplicated


def test_block_causal_mask_keeps_examples_apart():
    batch = collate([([5, 6, 7, 8, 9], [True] * 5, [0, 1, 0, 1, 2], [1, 1, 2, 2, 2])], pad_id=0)
    batch = collate([([5, 6, 7, 8, 9], [True] * 5, [0, 1, 0, 1, 2], [1, 1, 2, 2, 2]),
                     ([5, 6], [True] * 2, [0, 1], [1, 1])], pad_id=0)
    mask = batch.block_causal_mask()[:, 0]
    expected_row0 = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected_row0)
    assert mask[1, 4].tolist() == [False, False, False, False, True]  # a pad position sees only itself


def test_packed_logits_equal_separate_logits(tiny_model_dir, tokenizer):
    """The model sees a packed row exactly as it sees each example alone (both attention kernels)."""
    from transformers import AutoModelForCausalLM

    examples, _ = load_sft_examples("rayrl:addition/sft-train", tokenizer, max_length=16)
    first = examples[:3]
    ids, mask, pos, seg = pack_rows(first, max_length=64)[0]
    batch = collate([(ids, mask, pos, seg)], pad_id=tokenizer.pad_token_id)
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).eval()
        attention = batch.block_causal_mask(None if implementation == "sdpa" else torch.float32)
        with torch.no_grad():
            packed = model(input_ids=batch.input_ids, attention_mask=attention, position_ids=batch.position_ids).logits[0]
            start = 0
            for example in first:
                alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
                n = len(example.input_ids)
                torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
                start += n
        # Without the block mask the second example would see the first: the check can fail.
        with torch.no_grad():
            leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
        n0 = len(first[0].input_ids)
        assert not torch.allclose(leaky[n0:n0 + 2], packed[n0:n0 + 2], atol=1e-4)


def test_step_batcher_is_deterministic_and_splits_ranks(tokenizer):
    examples, _ = load_sft_examples("rayrl:addition/sft-train", tokenizer, max_length=16)
    make = lambda world: sft_step_batcher(examples[:100], global_batch_size=8, micro_batch_size=2, world_size=world,
                                     seed=3, shuffle=True, packing=False, max_length=16, pad_id=0)
    one, two = make(1), make(2)
    assert one.step_rows(7) == two.step_rows(7) == make(1).step_rows(7)
    assert one.step_rows(0) != one.step_rows(1)
    batches = two.step_batches(3)
    assert len(batches) == 2 and all(len(rank) == 2 for rank in batches)  # 8 rows = 2 ranks x 2 micro x 2
    flat = [row for rank in batches for micro in rank for row in micro.input_ids.tolist()]
    assert len(flat) == 8
    # epoch boundary: 100 rows, 8 per step -> step 12 spans epochs 0 and 1, both permutations complete
    seen = [r[0] for s in range(25) for r in one.step_rows(s)]
    assert sorted(map(tuple, seen[:100])) == sorted(tuple(e.input_ids) for e in examples[:100])


def test_sft_eval_takes_prompt_answer_rows_for_accuracy(tokenizer):
    """prompt/answer rows (the RL and DPO stages' eval form) give held-out accuracy; rows with a
    completion also give the held-out loss; eval.generation_data names the accuracy set explicitly."""
    from builtin_configs import build_config
    from rayrl.sft import load_sft_eval

    answers_only = load_sft_eval(build_config({"algorithm": "sft", "data": {"eval": "rayrl:addition/prompts-eval"},
                                               "eval": {"max_examples": 10}}), tokenizer)
    assert answers_only.loss_examples == [] and len(answers_only.accuracy_set.answers) == 10
    with_completions = load_sft_eval(build_config({"algorithm": "sft", "eval": {"max_examples": 10}}), tokenizer)
    assert len(with_completions.loss_examples) == 10 and len(with_completions.accuracy_set.answers) == 10
    named = load_sft_eval(build_config({"algorithm": "sft", "data": {"eval": None},
                                        "eval": {"generation_data": "rayrl:addition/prompts-eval", "max_examples": 4,
                                                 "every_steps": 5}}), tokenizer)
    assert named.loss_examples == [] and len(named.accuracy_set.prompt_ids) == 4
