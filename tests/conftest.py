"""Shared fixtures: a hermetic cache, loopback-only Ray, a tiny model built locally."""

from __future__ import annotations

import os

import pytest

# Keep every Ray process on loopback, and never reach for a model hub.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture(scope="session", autouse=True)
def rayrl_cache(tmp_path_factory):
    """Built-in models and datasets go to a per-session cache, not the user's home."""
    path = tmp_path_factory.mktemp("rayrl-cache")
    os.environ["RAYRL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rayrl.tiny import init_model

    return str(init_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for all integration tests (stages join it instead of starting one)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
