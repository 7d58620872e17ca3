import json

import pytest

from rayrl.data.loading import DataError
from rayrl.data.preference import collate_pairs, load_kto_examples, load_preference_pairs
from rayrl.dpo import kto_balance_warning
from builtin_configs import build_config


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_masks_and_collation(tmp_path, tokenizer):
    source = write_rows(tmp_path / "p.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}])
    pairs, stats = load_preference_pairs(source, tokenizer, max_length=16)
    assert stats.examples == 1
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in batch.tokens.input_ids.tolist()]
    assert tokens[0] == ["1", "+", "2", "=", "3", "<eos>"] and tokens[1] == ["1", "+", "2", "=", "4", "<eos>"]
    assert batch.tokens.loss_mask.tolist() == [[False] * 4 + [True] * 2] * 2
    assert batch.ref_logps is None and batch.num_examples == 1


def test_chat_format_pairs(tmp_path, tokenizer):
    row = {"prompt": [{"role": "user", "content": "1+2="}], "chosen": [{"role": "assistant", "content": "3"}],
           "rejected": [{"role": "assistant", "content": "4"}]}
    pairs, _ = load_preference_pairs(write_rows(tmp_path / "c.jsonl", [row]), tokenizer, max_length=32)
    assert tokenizer.convert_ids_to_tokens(pairs[0].chosen_ids) == ["3", "<|end|>"]
    assert tokenizer.convert_ids_to_tokens(pairs[0].prompt_ids)[-1] == "<|assistant|>"


def test_missing_rejected_names_file_line_and_field(tmp_path, tokenizer):
    source = write_rows(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                  {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=rf"{tmp_path}/bad.jsonl:2: missing field 'rejected'"):
        load_preference_pairs(source, tokenizer, max_length=16)


def test_kto_rows_need_boolean_label(tmp_path, tokenizer):
    source = write_rows(tmp_path / "k.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                                {"prompt": "a", "completion": "b", "label": "yes"}])
    with pytest.raises(DataError, match=r"k.jsonl:2: field 'label' must be bool"):
        load_kto_examples(source, tokenizer, max_length=16)


def test_kto_mismatched_completion_comes_from_another_row(tmp_path, tokenizer):
    source = write_rows(tmp_path / "k.jsonl", [{"prompt": "1=", "completion": "a", "label": True},
                                                {"prompt": "2=", "completion": "b", "label": False}])
    examples, stats = load_kto_examples(source, tokenizer, max_length=16)
    assert stats.desirable == 1
    assert list(examples[0].mismatched_ids) == examples[1].completion_ids


def test_kto_imbalance_warning():
    config = build_config({"algorithm": "dpo", "dpo": {"loss_type": "kto"}})
    assert kto_balance_warning(config, desirable=50, total=100) is None
    assert "imbalanced" in kto_balance_warning(config, desirable=95, total=100)
    weighted = build_config({"algorithm": "dpo", "dpo": {"loss_type": "kto", "kto_undesirable_weight": 19.0}})
    assert kto_balance_warning(weighted, desirable=95, total=100) is None  # weights restore the balance
    with pytest.raises(DataError, match="both desirable and undesirable"):
        kto_balance_warning(config, desirable=10, total=10)
