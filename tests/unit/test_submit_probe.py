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
