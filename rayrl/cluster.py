"""Connecting to Ray: an embedded local cluster by default, or an existing one by address."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rayrl.config import RayConfig

# Ray binds to the machine's routable address unless told otherwise; keep a local cluster on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Quiet, deterministic workers: no tokenizer thread pools fighting the trainer for cores.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Start (or join) Ray for the duration of a stage; shut it down only if we started it."""
    import ray

    if ray.is_initialized():
        yield
        return
    env_vars = dict(WORKER_ENV)
    if config.address is None:
        os.environ.update(LOOPBACK_ENV)
        env_vars.update(LOOPBACK_ENV)
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=config.log_to_driver,
                 runtime_env={"env_vars": env_vars}, configure_logging=False)
    else:
        ray.init(address=config.address, log_to_driver=config.log_to_driver,
                 runtime_env={"env_vars": env_vars})
    try:
        yield
    finally:
        ray.shutdown()


def check_cluster_resources(config: RayConfig, roles: dict[str, tuple[float, float]]) -> None:
    """Fail (embedded cluster) or warn (existing cluster, which may autoscale) when the roles ask for
    more CPUs or GPUs than Ray has: otherwise actors wait for resources forever."""
    import sys

    import ray

    from rayrl.config import ConfigError

    available = ray.cluster_resources()
    for index, resource in enumerate(("CPU", "GPU")):
        needed = sum(request[index] for request in roles.values())
        have = available.get(resource, 0.0)
        if needed > have + 1e-9:
            parts = ", ".join(f"{name} {request[index]:g}" for name, request in roles.items() if request[index])
            message = (f"the roles need {needed:g} {resource}s ({parts}) but the Ray cluster has {have:g}; "
                       f"lower the roles' num_{resource.lower()}s (fractions are fine) or use a bigger cluster")
            if config.address is None:
                raise ConfigError(message)
            print(f"warning: {message}", file=sys.stderr)


def trainer_roles(config) -> dict[str, tuple[float, float]]:
    world = config.trainer.world_size
    return {"trainer": (world * config.trainer.num_cpus, world * config.trainer.num_gpus)}
