"""`rayrl scale`: the request a running RL run takes between steps, and the errors it refuses with."""

from __future__ import annotations

import pytest
import yaml

from rayrl.cli import main
from rayrl.config import ConfigError
from rayrl.scaling import SCALE_REQUEST_FILE, request_scale, take_scale_request


def run_dir(tmp_path, **config):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"algorithm": "grpo", "placement": "split", **config}))
    return tmp_path


def test_a_request_is_left_for_the_run_and_taken_once(tmp_path):
    directory = run_dir(tmp_path)
    assert take_scale_request(directory) is None
    assert request_scale(directory, ["rollout.num_workers=3"]) == 3
    assert take_scale_request(directory) == 3
    assert take_scale_request(directory) is None  # consumed
    (directory / SCALE_REQUEST_FILE).write_text("{not json")
    assert take_scale_request(directory) is None and not (directory / SCALE_REQUEST_FILE).exists()


@pytest.mark.parametrize("config, overrides, message", [
    ({}, ["rollout.num_workers=0"], "must be a whole number >= 1, got '0'"),
    ({}, ["rollout.num_workers=two"], "must be a whole number >= 1"),
    ({}, ["trainer.world_size=2"], "give exactly rollout.num_workers=N"),
    ({}, ["rollout.num_workers=2", "rollout.num_workers=3"], "give exactly rollout.num_workers=N"),
    ({"algorithm": "sft"}, ["rollout.num_workers=2"], "only RL runs"),
    ({"placement": "colocated"}, ["rollout.num_workers=2"], "placement: colocated"),
    ({"rollout": {"weight_transport": "nccl"}}, ["rollout.num_workers=2"], "nccl"),
])
def test_bad_requests_are_refused_naming_why(tmp_path, config, overrides, message):
    directory = run_dir(tmp_path, **config)
    with pytest.raises(ConfigError, match=message):
        request_scale(directory, overrides)
    assert not (directory / SCALE_REQUEST_FILE).exists()


def test_the_cli_exits_2_on_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["scale", str(tmp_path), "rollout.num_workers=2"]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    run_dir(tmp_path)
    assert main(["scale", str(tmp_path), "rollout.num_workers=2"]) == 0
    assert take_scale_request(tmp_path) == 2
