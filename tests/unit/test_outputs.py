"""A fresh run into an output_dir that holds an earlier run moves that run aside (nothing mixes, nothing
is lost); a resumed run continues in place, from its newest intact checkpoint; and nothing is written
before everything that can be checked has been."""

import json

import pytest

from rayrl.checkpoint import CheckpointManager
from builtin_configs import build_config
from rayrl.config import ConfigError
from rayrl.stage_common import claim_output_dir, prepare_stage, records_resumed_at


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


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
    before = _snapshot(out)
    setup = prepare_stage(config)
    assert setup.start_step == 0 and setup.resume_from is None
    assert _snapshot(out) == before  # checked, not touched: a failing run leaves the earlier one in place
    claim_output_dir(config, setup)
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
    claim_output_dir(config, prepare_stage(config))
    assert not (out / "metrics.jsonl").exists() and len(list((out / "earlier_runs").iterdir())) == 1


def _resume_config(out, tiny_model_dir):
    return build_config({"algorithm": "sft", "output_dir": str(out), "model": {"path": tiny_model_dir},
                         "checkpoint": {"resume": True}})


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_keeps_its_records_up_to_the_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    _earlier_run(out, [1, 2, 3])
    CheckpointManager(out / "checkpoints", keep_last=2).save(2, lambda d: None, {})
    config = _resume_config(out, tiny_model_dir)
    setup = prepare_stage(config)
    claim_output_dir(config, setup)
    assert setup.start_step == 2
    assert _steps(out) == [1, 2, 3]  # records are cut only once the checkpoint has loaded
    records_resumed_at(config, setup.start_step)
    assert _steps(out) == [1, 2]
    assert not (out / "earlier_runs").exists()


def _engine_file(content):
    def write(directory):
        (directory / "engine.pt").write_bytes(content)
    return write


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    _earlier_run(out, [1, 2, 3, 4])
    checkpoints = CheckpointManager(out / "checkpoints", keep_last=3)
    checkpoints.save(2, _engine_file(b"weights at 2"), {})
    newest = checkpoints.save(4, _engine_file(b"weights at 4"), {})
    (newest / "engine.pt").write_bytes(b"weights at 4, damaged")
    assert "engine.pt" in CheckpointManager.verify(newest)
    before = _snapshot(out)
    setup = prepare_stage(_resume_config(out, tiny_model_dir))
    assert setup.resume_from.name == "step-00000002" and setup.start_step == 2
    said = capsys.readouterr().out
    assert "step-00000004 is damaged" in said and "resuming from step-00000002 instead" in said
    assert _snapshot(out) == before


def test_resume_with_only_a_damaged_checkpoint_names_the_file(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    _earlier_run(out, [1, 2])
    only = CheckpointManager(out / "checkpoints", keep_last=2).save(2, _engine_file(b"w"), {})
    (only / "trainer_state.json").write_text('{"step": 2, "da')  # truncated
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="trainer_state.json: cannot be read"):
        prepare_stage(_resume_config(out, tiny_model_dir))
    assert _snapshot(out) == before
