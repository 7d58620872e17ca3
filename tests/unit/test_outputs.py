"""A fresh run into an output_dir that holds an earlier run moves that run aside (nothing mixes, nothing
is lost); a resumed run continues in place."""

import json

from rayrl.config import build_config
from rayrl.stage_common import prepare_stage


def _earlier_run(output_dir, steps):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))
    (output_dir / "final").mkdir(exist_ok=True)
    (output_dir / "final" / "model.safetensors").write_text("earlier weights")
    (output_dir / "wandb_run_id").write_text("abc123")


def test_a_fresh_run_moves_an_earlier_run_aside(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    _earlier_run(out, [1, 2, 3])
    config = build_config({"algorithm": "sft", "output_dir": str(out), "model": {"path": tiny_model_dir}})
    setup = prepare_stage(config)
    assert setup.start_step == 0 and setup.resume_from is None
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()
    assert not (out / "wandb_run_id").exists()  # a new W&B run, not the earlier one's
    (archived,) = (out / "earlier_runs").iterdir()
    assert (archived / "final" / "model.safetensors").read_text() == "earlier weights"
    assert len((archived / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "config.yaml").exists()


def test_resume_without_a_checkpoint_is_a_fresh_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    _earlier_run(out, [1, 2])
    config = build_config({"algorithm": "sft", "output_dir": str(out), "model": {"path": tiny_model_dir},
                           "checkpoint": {"resume": True}})
    prepare_stage(config)
    assert not (out / "metrics.jsonl").exists() and len(list((out / "earlier_runs").iterdir())) == 1


def test_a_resumed_run_keeps_its_records_up_to_the_checkpoint(tmp_path, tiny_model_dir):
    from rayrl.checkpoint import CheckpointManager

    out = tmp_path / "run"
    _earlier_run(out, [1, 2, 3])
    CheckpointManager(out / "checkpoints", keep_last=2).save(2, lambda d: None, {})
    config = build_config({"algorithm": "sft", "output_dir": str(out), "model": {"path": tiny_model_dir},
                           "checkpoint": {"resume": True}})
    setup = prepare_stage(config)
    assert setup.start_step == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "earlier_runs").exists()
