"""GRPO on a multi-node Ray cluster: three Ray nodes on loopback (``ray.cluster_utils.Cluster``), a head
with no CPUs and two workers with one CPU each, joined by ``rayrl train ... ray.address=HOST:PORT``.

The roles' CPU requests leave Ray one way to place them, so ``placement.json`` (which node each actor
landed on) must show the layout's rules across nodes:
- split: the trainer fills one worker node, the rollout worker gets the other (weights sync between nodes);
- colocated: the two trainer ranks' bundles (rank + rollout worker) do not fit one node, so they spread
  over both, DeepSpeed runs across nodes and rollout worker i sits on rank i's node.
No role lands on the head (0 CPUs). Sampler and trainer log-probs agree after every cross-node sync.

The cluster is private to this module: its own temp dir (and so its own address file: ``ray.init()``
elsewhere on the machine never finds it), stopped at the end. The run is a subprocess, so the
conftest's embedded cluster (if another test started it in this process) is not in the way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from rayrl.tracking import read_metrics

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set; this test starts its own cluster")
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rrmn", dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # Cluster writes its address file under the default temp dir
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback
    common = {"include_dashboard": False, "object_store_memory": 150 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1}, **common})
    try:
        for index in range(2):
            cluster.add_node(num_cpus=1, resources={"worker": 1, f"worker_{index}": 1}, **common)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_train(tmp_path: Path, address: str, model_path: str, **sections) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path / "run"
    config = {
        "algorithm": "grpo", "output_dir": str(out), "seed": 0, "model": {"path": model_path},
        "data": {"train": "rayrl:addition/prompts-train"},
        "ray": {"address": address},
        "rollout": {"backend": "vllm", "group_size": 4, "max_new_tokens": 4, "kv_cache_gib": 0.25},
        "grpo": {"prompts_per_step": 4},
        "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-3},
        "verifier": {"num_workers": 1, "num_cpus": 0.1},
        "eval": {"at_start": False, "every_steps": 0, "max_examples": 8, "max_new_tokens": 4},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    proc = subprocess.run([sys.executable, "-m", "rayrl.cli", "train", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def check_run(out: Path) -> dict:
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["policy_version/sampled_min"] for r in steps] == [0, 1]
    # the rollout engine on another node got the trainer's weights: its log-probs match the trainer's
    assert all(r["logprob_gap/sampler_trainer"] < 1e-3 for r in steps)
    placement = json.loads((out / "placement.json").read_text())
    nodes = placement["nodes"]
    assert not any(node["head"] for node in nodes.values()), placement  # the head has no CPUs: no role there
    assert all(node["ip"] == "127.0.0.1" for node in nodes.values())  # loopback only
    assert all(node["resources"].get("worker") == 1 for node in nodes.values())
    return placement


def test_split_roles_spread_over_nodes(cluster, tmp_path, tiny_model_dir):
    # trainer 1 CPU (a whole worker node), rollout 0.75 CPU: only the other node has room for it; custom
    # resources pin which node each role gets (node groups, as KubeRay worker groups declare them)
    out, proc = run_train(tmp_path, cluster.address, tiny_model_dir, placement="split",
                          trainer={"world_size": 1, "num_cpus": 1.0, "resources": {"worker_1": 0.5}},
                          rollout={"num_workers": 1, "num_cpus": 0.75, "resources": {"worker_0": 0.5}})
    placement = check_run(out)
    roles = placement["roles"]
    assert placement["layout"] == "split" and placement["num_nodes"] == 2
    assert len(roles["trainer"]) == 1 and len(roles["rollout"]) == 1 and len(roles["verifier"]) == 1
    assert roles["trainer"][0] != roles["rollout"][0]
    assert "worker_1" in placement["nodes"][roles["trainer"][0]]["resources"]
    assert "worker_0" in placement["nodes"][roles["rollout"][0]]["resources"]
    assert roles["verifier"][0] == roles["rollout"][0]  # the only node with CPU left
    assert "placement (split, 2 node(s))" in proc.stderr


def test_colocated_ranks_spread_with_their_rollout_workers(cluster, tmp_path, tiny_model_dir):
    # each rank's bundle is 0.5 (rank) + 0.4 (its rollout worker) CPU: two bundles cannot share a 1-CPU node
    out, proc = run_train(tmp_path, cluster.address, tiny_model_dir, placement="colocated",
                          trainer={"world_size": 2, "num_cpus": 0.5},
                          rollout={"num_workers": 2, "num_cpus": 0.4},
                          verifier={"num_workers": 1, "num_cpus": 0.1, "resources": {"worker_1": 0.1}})
    placement = check_run(out)
    roles = placement["roles"]
    assert placement["layout"] == "colocated" and placement["num_nodes"] == 2
    assert len(set(roles["trainer"])) == 2  # DeepSpeed ranks on two nodes
    assert roles["rollout"] == roles["trainer"]  # rollout worker i in rank i's bundle, on its node
    assert "worker_1" in placement["nodes"][roles["verifier"][0]]["resources"]  # pinned by verifier.resources
    assert (out / "final" / "model.safetensors").exists()
    assert "placement (colocated, 2 node(s))" in proc.stderr
