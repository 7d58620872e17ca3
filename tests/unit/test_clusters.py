"""The cluster files in clusters/ parse, have the expected shape, and run valid rayrl commands."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from rayrl.cli import build_parser
from rayrl.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
IMAGE = "rayrl:latest"


def docs(name):
    return [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d is not None]


def check_rayrl_command(words: list[str]) -> None:
    """`python -m rayrl.cli train CONFIG KEY=VALUE...` parses and its config validates (from the repo)."""
    assert words[:3] == ["python", "-m", "rayrl.cli"], words
    args = build_parser().parse_args(words[3:])
    assert args.command == "train"
    assert (REPO / args.config).is_file() and args.config.startswith("examples/")
    load_config(REPO / args.config, args.overrides)


def containers(pod_template):
    return pod_template["spec"]["containers"]


def test_dockerfile_builds_the_image_the_cluster_files_name():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"-t {IMAGE}" in text
    for line in text.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (REPO / source).exists(), source


def test_raycluster_has_separate_rollout_and_train_gpu_groups():
    (cluster,) = docs("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    head = containers(spec["headGroupSpec"]["template"])[0]
    assert head["image"] == IMAGE and head["resources"]["limits"]["cpu"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"rollout-gpu", "train-gpu"}
    for group in groups.values():
        (container,) = containers(group["template"])
        assert container["image"] == IMAGE
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) > 0 and group["rayStartParams"]["num-gpus"] == gpus
        assert {e["name"] for e in container["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    submit = re.search(r"(rayrl submit .*)", (CLUSTERS / "raycluster.yaml").read_text()).group(1)
    args = build_parser().parse_args(shlex.split(submit)[1:])
    assert args.command == "submit" and args.wait
    load_config(REPO / args.config, args.overrides)


def test_rayjob_runs_a_valid_rayrl_stage():
    (job,) = docs("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    check_rayrl_command(shlex.split(job["spec"]["entrypoint"]))
    cluster = job["spec"]["rayClusterSpec"]
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == {"rollout-gpu", "train-gpu"}
    images = [c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in containers(g["template"])]
    assert images and set(images) == {IMAGE}
    assert all(int(containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
               for g in cluster["workerGroupSpecs"])
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_cluster_launcher_config():
    (config,) = docs("cluster-launcher.yaml")
    assert config["docker"]["image"] == IMAGE
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] > 0
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    text = (CLUSTERS / "cluster-launcher.yaml").read_text()
    exec_cmd = re.search(r'ray exec \S+ "([^"]+)"', text).group(1)
    check_rayrl_command(shlex.split(exec_cmd))
    submit = re.search(r"(rayrl submit .*)", text).group(1)
    args = build_parser().parse_args(shlex.split(submit)[1:])
    load_config(REPO / args.config, args.overrides)


def test_sbatch_script_is_valid_bash_and_runs_a_valid_stage():
    path = CLUSTERS / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert "#SBATCH --nodes=" in text and "ray start --head" in text and "srun" in text
    assert re.search(r"ray start --address=", text)
    default_config = re.search(r"CONFIG=\$\{1:-(\S+)\}", text).group(1)
    line = next(l for l in text.splitlines() if "-m rayrl.cli train" in l)
    words = shlex.split(line.replace('"$RAYRL_PYTHON"', "python").replace('"$CONFIG"', default_config)
                        .replace('"$@"', "").replace("$head_ip:$PORT", "10.0.0.1:6379").split("||")[0])
    check_rayrl_command(words)




def test_readme_documents_every_file():
    readme = (CLUSTERS / "README.md").read_text()
    for name in ("Dockerfile", "raycluster.yaml", "rayjob.yaml", "cluster-launcher.yaml", "slurm.sbatch"):
        assert name in readme
