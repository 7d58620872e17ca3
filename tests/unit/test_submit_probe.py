"""The probe job that checks the cluster's Python is cleaned up even when Ray's job monitor writes it back."""
from __future__ import annotations

import pytest

from rayrl.submit import SubmitError, check_cluster_imports_rayrl


class MonitorRacingJobs:
    """A job client whose monitor writes a deleted job back once (Ray's job manager does this when its
    one-second poll lands between the delete and its noticing the supervisor's exit)."""

    def __init__(self, final_status: str, resurrections: int = 1):
        self.final_status, self.resurrections = final_status, resurrections
        self.jobs: dict[str, str] = {}
        self.deletes = 0

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.jobs[submission_id] = self.final_status

    def get_job_status(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError("Request failed with status code 404")
        return self.jobs[job_id]

    def get_job_logs(self, job_id):
        return "ModuleNotFoundError: No module named 'rayrl'\n"

    def delete_job(self, job_id):
        self.deletes += 1
        self.jobs.pop(job_id)
        if self.resurrections:
            self.resurrections -= 1
            self.jobs[job_id] = "FAILED"  # "Job supervisor actor died", written after the delete

    def stop_job(self, job_id):
        raise AssertionError("the probe had ended")


def test_a_probe_written_back_by_the_monitor_is_deleted_again():
    jobs = MonitorRacingJobs("SUCCEEDED")
    check_cluster_imports_rayrl(jobs, "python", {})
    assert jobs.jobs == {} and jobs.deletes == 2


def test_a_failed_probe_is_refused_and_deleted():
    jobs = MonitorRacingJobs("FAILED", resurrections=0)
    with pytest.raises(SubmitError, match="cannot import rayrl.*No module named 'rayrl'"):
        check_cluster_imports_rayrl(jobs, "python -I", {})
    assert jobs.jobs == {} and jobs.deletes == 1


class ScaleJobs(MonitorRacingJobs):
    """A cluster with one job `rayrl submit` started, whose short jobs end with ``final_status``."""

    def __init__(self, final_status: str, log: str = ""):
        super().__init__(final_status, resurrections=0)
        self.log, self.entrypoints = log, []

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        self.entrypoints.append(entrypoint)
        super().submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                           metadata=metadata)

    def get_job_info(self, job_id):
        if job_id != "rayrl-grpo-1":
            raise RuntimeError("Request failed with status code 404")
        return type("Info", (), {"metadata": {"output_dir": "/shared/runs/grpo"}})()

    def get_job_logs(self, job_id):
        return self.log


def test_scale_through_the_cluster_names_the_run_by_job_id_and_cleans_up():
    from rayrl.submit import request_scale_on_cluster

    jobs = ScaleJobs("SUCCEEDED")
    assert request_scale_on_cluster("rayrl-grpo-1", ["rollout.num_workers=4"], address=None, client_=jobs) == \
        ("/shared/runs/grpo", 4)
    assert jobs.entrypoints == ["python -m rayrl.cli scale /shared/runs/grpo rollout.num_workers=4"]
    assert jobs.jobs == {}  # the short job is deleted
    assert request_scale_on_cluster("/other dir", ["rollout.num_workers=2"], address=None, client_=jobs,
                                    python="py3")[0] == "/other dir"
    assert jobs.entrypoints[-1] == "py3 -m rayrl.cli scale '/other dir' rollout.num_workers=2"


def test_scale_through_the_cluster_reports_its_refusal_and_checks_the_request_first():
    from rayrl.config import ConfigError
    from rayrl.submit import request_scale_on_cluster

    refused = ScaleJobs("FAILED", log="rayrl: error: scale: /x holds no config.yaml: not the output_dir of a run\n")
    with pytest.raises(SubmitError, match="did not take the scale request: .*holds no config.yaml"):
        request_scale_on_cluster("/x", ["rollout.num_workers=2"], address=None, client_=refused)
    assert refused.jobs == {}
    nothing_sent = ScaleJobs("SUCCEEDED")
    with pytest.raises(ConfigError, match="give exactly rollout.num_workers=N"):
        request_scale_on_cluster("/x", ["train.lr=1"], address=None, client_=nothing_sent)
    assert nothing_sent.entrypoints == []
