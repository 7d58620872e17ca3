"""`rayrl submit` / `rayrl jobs` against a real token-auth Ray head started here (on loopback).

The head is private to this module: its own ports and temp dir, stopped by its own process group
(never `ray stop`, which would kill every Ray cluster on the machine). The conftest `ray_cluster`
fixture is not used and RAY_ADDRESS is never set in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayrl.config import load_config
from rayrl.submit import FILES_DIR, STAGED_CONFIG, auth_headers, stage, start_local_head

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SECRET = "some-fake-secret-3f9c2a"
TINY = ["train.max_steps=2", "train.warmup_steps=0", "eval.at_start=false", "eval.every_steps=0",
        "eval.max_examples=8", "trainer.num_cpus=0.5", "tracking.wandb.mode=offline"]


def submitter_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_API_KEY": SECRET}, **extra)
    return env


def rayrl(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "rayrl.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or submitter_env())


@pytest.fixture(scope="module")
def head():
    if "RAY_ADDRESS" in os.environ:
        pytest.skip("RAY_ADDRESS is set; this test starts its own head")
    venv_bin = str(Path(sys.executable).parent)
    # The job's `python` must be this venv's (rayrl installed); token auth stays at Ray's default (on).
    head = start_local_head(num_cpus=2, env={"PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")},
                            drop_env=("RAY_ADDRESS", "WANDB_MODE", "WANDB_API_KEY", "RAY_AUTH_MODE"))
    try:
        yield head
    finally:
        head.stop()
    assert "RAY_ADDRESS" not in os.environ


def all_text(directory: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in directory.rglob("*") if p.is_file())


def test_tiny_sft_job_succeeds_and_the_key_stays_out_of_files(head, tmp_path):
    out = tmp_path / "run"
    staged = tmp_path / "staged"
    proc = rayrl("submit", "examples/sft.yaml", *TINY, f"output_dir={out}", "--address", head.address, "--wait",
                 "--env", "RAYRL_CACHE", "--keep-staged", str(staged))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.strip().splitlines()[0]
    assert job_id.startswith("rayrl-sft-")
    assert "SUCCEEDED" in proc.stderr
    assert (out / "metrics.jsonl").is_file() and (out / "final" / "model.safetensors").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "the job did not run W&B offline"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and SECRET not in all_text(out)
    assert SECRET not in all_text(staged) and (staged / STAGED_CONFIG).is_file()
    assert SECRET not in proc.stdout + proc.stderr

    status = rayrl("jobs", "status", job_id, "--address", head.address)
    assert status.returncode == 0 and '"SUCCEEDED"' in status.stdout and SECRET not in status.stdout
    listing = rayrl("jobs", "list", "--address", head.address)
    assert listing.returncode == 0 and job_id in listing.stdout
    logs = rayrl("jobs", "logs", job_id, "--address", head.address)
    assert logs.returncode == 0 and '"steps": 2' in logs.stdout

    report = rayrl("report", str(out))
    assert report.returncode == 0 and (out / "report" / "index.html").is_file()
    assert (out / "report" / "loss.png").is_file()


def test_a_job_that_fails_on_the_cluster_exits_non_zero(head, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')  # row 2 is malformed
    proc = rayrl("submit", "examples/sft.yaml", *TINY, f"data.train={data}", "data.eval=null",
                 f"output_dir={tmp_path / 'bad'}", "--address", head.address, "--wait", "--env", "RAYRL_CACHE")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "FAILED" in proc.stderr
    assert "missing field 'completion'" in proc.stdout  # the streamed job log


def test_bad_config_is_rejected_before_submission(head, tmp_path):
    before = rayrl("jobs", "list", "--json", "--address", head.address).stdout
    local = rayrl("train", "examples/sft.yaml", "train.max_step=5")
    remote = rayrl("submit", "examples/sft.yaml", "train.max_step=5", "--address", head.address)
    assert local.returncode == remote.returncode == 2
    assert remote.stderr == local.stderr and "unknown key 'train.max_step'" in remote.stderr
    assert remote.stdout == "" and "Traceback" not in remote.stderr
    assert rayrl("jobs", "list", "--json", "--address", head.address).stdout == before


def test_a_cluster_python_without_rayrl_is_refused_before_submission(head, tmp_path):
    before = rayrl("jobs", "list", "--json", "--address", head.address).stdout
    # -I -S: no PYTHONPATH, no site-packages: this interpreter cannot import rayrl (as a cluster without it).
    proc = rayrl("submit", "examples/sft.yaml", *TINY, f"output_dir={tmp_path / 'x'}", "--address", head.address,
                 "--python", f"{sys.executable} -I -S")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot import rayrl" in proc.stderr and "No module named 'rayrl'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert rayrl("jobs", "list", "--json", "--address", head.address).stdout == before  # probe deleted, no job


def test_token_auth_is_on_and_a_wrong_token_is_refused(head):
    assert auth_headers(), "no Ray auth token found (~/.ray/auth_token)"
    from ray.job_submission import JobSubmissionClient

    env = submitter_env()
    env.pop("RAY_AUTH_MODE", None)
    # Ray's own client without the token is refused: auth really is on.
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C\n"
            f"try:\n    C({head.address!r}).list_jobs()\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert bare.returncode == 3 and "auth" in bare.stdout.lower()
    wrong = rayrl("jobs", "list", "--address", head.address, env=submitter_env(RAY_AUTH_TOKEN="not-the-token"))
    assert wrong.returncode == 2 and "rayrl: error:" in wrong.stderr
    assert JobSubmissionClient(head.address, headers=auth_headers()).list_jobs() is not None


def test_staging_copies_only_the_users_files(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config("examples/grpo_user.yaml")
    staged = stage(config, tmp_path / "s")
    data = yaml.safe_load((tmp_path / "s" / STAGED_CONFIG).read_text())
    assert sorted(staged.files) == sorted(["examples/data/addition_prompts.jsonl",
                                           "examples/data/addition_prompts_eval.jsonl",
                                           "examples/rewards/my_reward.py"])
    assert data["data"]["train"].startswith(FILES_DIR + "/") and data["rewards"][0]["fn"].endswith(".py:answer_reward")
    assert Path(data["output_dir"]).is_absolute() and data["ray"]["address"] == "auto"
    assert staged.bytes < 200_000
    monkeypatch.chdir(tmp_path / "s")  # the job's cwd: the staged config validates there
    assert load_config(STAGED_CONFIG).data.train == data["data"]["train"]


def test_scale_through_the_cluster_writes_the_request_where_the_run_is(head, tmp_path):
    """`rayrl scale --address`: a short job writes the request into the run's output_dir on the cluster's
    side (the file the run reads between steps: tests/integration/test_rollout_scaling.py), named by the
    directory or by the job id `rayrl submit` printed; the cluster's refusal comes back as the error."""
    from ray.job_submission import JobSubmissionClient

    run = tmp_path / "rl-run"
    run.mkdir()
    (run / "config.yaml").write_text("algorithm: grpo\nplacement: split\n")
    before = rayrl("jobs", "list", "--json", "--address", head.address).stdout
    proc = rayrl("scale", str(run), "rollout.num_workers=3", "--address", head.address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "scale_request.json").read_text()) == {"rollout.num_workers": 3}
    assert rayrl("jobs", "list", "--json", "--address", head.address).stdout == before  # the short job is deleted

    # by job id: the output_dir comes from the job's metadata (as `rayrl submit` sets it)
    jobs = JobSubmissionClient(head.address, headers=auth_headers())
    job_id = jobs.submit_job(entrypoint="python -c 'pass'", metadata={"output_dir": str(run)})
    (run / "scale_request.json").unlink()
    proc = rayrl("scale", job_id, "rollout.num_workers=2", "--address", head.address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"asked the run in {run} for 2" in proc.stdout
    assert json.loads((run / "scale_request.json").read_text()) == {"rollout.num_workers": 2}

    refused = rayrl("scale", str(tmp_path / "nothing"), "rollout.num_workers=2", "--address", head.address)
    assert refused.returncode == 2 and "holds no config.yaml: not the output_dir of a run" in refused.stderr
    assert "Traceback" not in refused.stderr
    malformed = rayrl("scale", str(run), "rollout.num_workers=0", "--address", head.address)
    assert malformed.returncode == 2 and "must be a whole number >= 1" in malformed.stderr
