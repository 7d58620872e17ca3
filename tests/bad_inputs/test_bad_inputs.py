"""Bad input, as a careless user gives it: each case must end with exit code 2, one line that names the
key (and the file and line where there is one), and an output_dir exactly as it was before (here it
holds an earlier, finished run that must not move).

Each case runs ``rayrl`` in this process (``cli.main``): nothing in these cases starts Ray, so they
stay fast; the one with a Ray address checks that no cluster answering is found within the deadline.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from rayrl.checkpoint import CheckpointManager
from rayrl.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def files(tmp_path, tiny_model_dir):
    """The inputs the cases refer to, and an output_dir holding an earlier finished run."""
    paths = {"model": tiny_model_dir}
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "garbage_model").mkdir()
    (tmp_path / "garbage_model" / "config.json").write_text("{not json")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_text("earlier weights")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (out / "config.yaml").write_text("earlier config\n")
    paths.update({name: str(tmp_path / name) for name in ("a_file", "empty_dir", "garbage_model", "latin1.jsonl")})
    paths["out"] = str(out)
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SFT = str(EXAMPLES / "sft.yaml")
GRPO = str(EXAMPLES / "grpo.yaml")
SHORT = ["train.max_steps=2", "train.warmup_steps=0"]

# (id, config, overrides (formatted with the fixture's paths), what the one-line error must contain)
CASES = [
    ("lr-inf", SFT, ["train.lr=.inf"], ["train.lr"]),
    ("lr-nan", SFT, ["train.lr=.nan"], ["train.lr"]),
    ("temperature-inf", GRPO, ["rollout.temperature=.inf"], ["rollout.temperature"]),
    ("reward-weight-nan", GRPO, ["rewards=[{fn: math_answer, weight: .nan}]"], ["rewards.0.weight"]),
    ("reward-fallback-inf", GRPO, ["rewards=[{fn: math_answer, fallback: -.inf}]"], ["rewards.0.fallback"]),
    ("unknown-key", SFT, ["train.learning_rate=1e-4"], ["train.learning_rate"]),
    ("model-missing-dir", SFT, ["model.path=/nonexistent/model"], ["model.path", "/nonexistent/model"]),
    ("model-empty-dir", SFT, ["model.path={empty_dir}"], ["model.path", "config.json"]),
    ("model-garbage-config", SFT, ["model.path={garbage_model}"], ["model.path", "config.json:1", "not valid JSON"]),
    ("model-is-a-file", SFT, ["model.path={a_file}"], ["model.path", "is a file"]),
    # a hub name that is not in the local cache, offline (HF_HUB_OFFLINE=1, as on these machines)
    ("model-offline-hub-name", SFT, ["model.path=no-such-org/no-such-model"],
     ["model.path", "no-such-org/no-such-model", "not a local directory"]),
    ("data-missing", SFT, ["data.train=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl"]),
    ("data-not-utf8", SFT, ["data.train={latin1.jsonl}"], ["latin1.jsonl:2", "UTF-8"]),
    ("output-dir-is-a-file", SFT, ["output_dir={a_file}"], ["output_dir", "not a directory"]),
    ("unknown-reward", GRPO, ["rewards=[{fn: math_answr}]"], ["rewards[0].fn", "math_answer"]),
    ("reward-file-missing", GRPO, ["rewards=[{fn: /nonexistent/rewards.py:score}]"], ["rewards[0].fn", "file not found"]),
    ("bad-isolation", GRPO, ["rewards=[{fn: python_tests, options: {isolation: none}}]"], ["rewards[0].fn", "isolation"]),
    ("dead-ray-address", SFT, ["ray.address=127.0.0.1:{port}"], ["ray.address", "127.0.0.1"]),
]


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("config, overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_touches_nothing(config, overrides, expected, files, capsys):
    fill = {**files, "port": _free_port()}
    args = ["train", config, f"output_dir={files['out']}", "model.path={model}", *SHORT, *overrides]
    for name, value in fill.items():
        args = [a.replace("{" + name + "}", str(value)) for a in args]
    before = _snapshot(Path(files["out"]))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = next((line for line in err if line.startswith("rayrl: error:")), None)
    assert message is not None, err
    # One line: the message, and at most the list of a config's errors under it (each naming its key).
    assert all(line.startswith("  ") for line in err[err.index(message) + 1:]), err
    text = "\n".join(err[err.index(message):])
    for part in expected:
        assert part in text, text
    assert "Traceback" not in "\n".join(err)
    assert _snapshot(Path(files["out"])) == before


def test_resume_from_a_damaged_checkpoint_only_is_a_clear_error(files, capsys):
    out = Path(files["out"])
    only = CheckpointManager(out / "checkpoints", keep_last=2).save(2, lambda d: (d / "engine.pt").write_bytes(b"w"), {})
    (only / "trainer_state.json").write_text('{"step": 2, "da')
    before = _snapshot(out)
    assert main(["train", SFT, f"output_dir={out}", f"model.path={files['model']}", *SHORT,
                 "checkpoint.resume=true"]) == 2
    assert "trainer_state.json: cannot be read" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_init_model_onto_a_file_and_report_of_a_malformed_file(files, tmp_path, capsys):
    assert main(["init-model", files["a_file"]]) == 2
    assert "not a directory" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{broken\n{"step": 2, "loss": 0.5}\n')
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err
