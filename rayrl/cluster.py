"""Connecting to Ray: an embedded local cluster by default, or an existing one by address; resource
checks; and a record of which node each role's actors landed on (``placement.json``)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from rayrl.config import ConfigError, RayConfig

# Ray binds to the machine's routable address unless told otherwise; keep a local cluster on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Quiet, deterministic workers: no tokenizer thread pools fighting the trainer for cores.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Start (or join) Ray for the duration of a stage; shut it down only if we started it."""
    import ray  # slow: ray

    if config.address is not None:
        check_reachable(config.address)  # also when this process already has a Ray session
    if ray.is_initialized():
        yield
        return
    env_vars = dict(WORKER_ENV)
    if config.address is None:
        os.environ.update(LOOPBACK_ENV)
        env_vars.update(LOOPBACK_ENV)
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=config.log_to_driver,
                 runtime_env={"env_vars": env_vars}, configure_logging=False)
        _watch_for_driver_death()
    else:
        try:
            ray.init(address=config.address, log_to_driver=config.log_to_driver,
                     runtime_env={"env_vars": env_vars})
        except (ConnectionError, TimeoutError) as error:
            raise ConfigError(f"ray.address: cannot join the Ray cluster at {config.address!r}: "
                              f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None
    try:
        yield
    finally:
        ray.shutdown()


_reaper_pipe: int | None = None


def _watch_for_driver_death() -> None:
    """Once per process: a watcher that ends this embedded cluster's processes if this driver dies
    without shutting it down (``rayrl.reaper``)."""
    global _reaper_pipe
    if _reaper_pipe is None:
        from rayrl.reaper import start_reaper

        _reaper_pipe = start_reaper()


# How long joining a cluster may take to answer at all: Ray's own client retries for minutes.
CONNECT_DEADLINE_S = 10.0


def check_reachable(address: str, deadline_s: float = CONNECT_DEADLINE_S) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a TCP connection within the
    deadline (Ray would retry a dead address for minutes); ``auto`` is left to Ray, which fails fast."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=deadline_s):
            pass
    except OSError as error:
        reason = (f"no answer within {deadline_s:g} s" if isinstance(error, TimeoutError)
                  else (error.strerror or type(error).__name__))
        raise ConfigError(f"ray.address: no Ray cluster answers at {address!r} ({reason}); "
                          "start one (`ray start --head`) or fix the address") from None


def check_cluster_resources(config: RayConfig, roles: dict[str, tuple[float, float]]) -> None:
    """Fail (embedded cluster) or warn (existing cluster, which may autoscale) when the roles ask for
    more CPUs or GPUs than Ray has: otherwise actors wait for resources forever."""
    import ray  # slow: ray

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


PLACEMENT_FILE = "placement.json"


def _actor_node_id(_instance: Any) -> str:
    """Run inside an actor (through ``__ray_call__``): the id of the Ray node it lives on."""
    import ray  # slow: ray

    return ray.get_runtime_context().get_node_id()


PLACEMENT_ANSWER_S = 60.0


def record_placement(output_dir: str | Path, layout: str, roles: dict[str, list]) -> dict[str, Any] | None:
    """Ask every actor of every role which Ray node it runs on and write ``output_dir/placement.json``:

        {"layout": "split", "num_nodes": 2,
         "nodes": {NODE_ID: {"ip": ..., "head": bool, "resources": {...}}},   # the nodes the roles use
         "roles": {"trainer": [NODE_ID, ...], "rollout": [...], ...}}         # one entry per actor, in order

    Waits for the actors to start (a later call would wait for them anyway). Never fails a run: on an
    error it warns and returns None."""
    import ray  # slow: ray

    roles = {name: list(actors) for name, actors in roles.items() if actors}
    try:
        refs = {name: [actor.__ray_call__.remote(_actor_node_id) for actor in actors] for name, actors in roles.items()}
        # All the actors answered their startup already (identify): a short deadline is plenty.
        placed = {name: ray.get(node_refs, timeout=PLACEMENT_ANSWER_S) for name, node_refs in refs.items()}
        alive = {node["NodeID"]: node for node in ray.nodes() if node.get("Alive")}
    except Exception as exc:  # an actor that failed to start fails the run at its first real call
        print(f"warning: could not record the roles' placement: {exc}", file=sys.stderr)
        return None
    used = sorted({node_id for node_ids in placed.values() for node_id in node_ids})
    nodes = {}
    for node_id in used:
        info = alive.get(node_id, {})
        resources = info.get("Resources", {})
        nodes[node_id] = {"ip": info.get("NodeManagerAddress"), "head": "node:__internal_head__" in resources,
                          "resources": {k: v for k, v in resources.items() if not k.startswith("node:")}}
    record = {"layout": layout, "num_nodes": len(used), "nodes": nodes, "roles": placed}
    path = Path(output_dir) / PLACEMENT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return record


def describe_placement(record: dict[str, Any]) -> str:
    """One console line: ``placement (split, 2 nodes): trainer x2 on n0; rollout x1 on n1``."""
    labels = {node_id: f"n{i}" for i, node_id in enumerate(record["nodes"])}
    parts = []
    for name, node_ids in record["roles"].items():
        where = ",".join(sorted({labels[n] for n in node_ids}))
        parts.append(f"{name} x{len(node_ids)} on {where}")
    legend = ", ".join(f"{label}={node_id[:8]}{' (head)' if record['nodes'][node_id]['head'] else ''}"
                       for node_id, label in labels.items())
    return f"placement ({record['layout']}, {record['num_nodes']} node(s)): " + "; ".join(parts) + f" [{legend}]"
