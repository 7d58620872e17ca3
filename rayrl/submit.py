"""Run a stage on a remote Ray cluster as a Ray job (the Job Submission SDK).

``rayrl submit CONFIG [KEY=VALUE ...] --address http://HEAD:8265`` does, in order:

1. validates the config locally (``load_config``; the same error as ``rayrl train``, nothing sent);
2. stages a small ``working_dir``: the resolved config (overrides applied, every default filled in)
   as ``staged_config.yaml``, plus copies of the user's own local files it names (dataset files,
   ``file.py:fn`` reward functions), rewritten to point at the copies. Built-in ``rayrl:`` names,
   hub names and modules need nothing. The repository itself is not uploaded: the cluster's Python
   must have rayrl installed (the ``rayrl:latest`` image, or the same venv on a shared filesystem);
3. submits ``python -m rayrl.cli train staged_config.yaml`` with the environment the run needs in
   the job's runtime env ``env_vars`` (never in a file): loopback/offline switches that are set
   here, and the W&B API key from this shell's ``WANDB_API_KEY``.

Token authentication (on by default since Ray 2.60): the dashboard wants ``Authorization: Bearer
<token>``. Ray's own client only sends it when ``RAY_AUTH_MODE=token`` is exported; rayrl reads the
token the way Ray documents (``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``) and sends the header itself, so no extra export is needed.
``RAY_AUTH_MODE=disabled`` sends no token.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayrl.config import config_to_dict, load_config
from rayrl.scaling import SCALABLE_KEY, parse_scale_request

STAGED_CONFIG = "staged_config.yaml"
FILES_DIR = "files"
# Passed through to the job when set in the submitter's environment.
PASSTHROUGH_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                   "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_TOKEN", "HF_ENDPOINT",
                   "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY")
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A problem reaching or using the cluster; the message is for the user."""


# ------------------------------------------------------------------------------------------------
# Authentication

def auth_token() -> str | None:
    """The Ray auth token from the places Ray documents, or None (or RAY_AUTH_MODE=disabled)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_text = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_text).expanduser() if path_text else Path.home() / ".ray" / "auth_token"
    if path.is_file():
        return path.read_text().strip() or None
    if path_text:
        raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path_text}: no such file")
    return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    """A JobSubmissionClient for ``address`` (or $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS) carrying the token."""
    from ray.job_submission import JobSubmissionClient  # slow: ray (the CLI imports this module)

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # connection refused, auth failure, version mismatch
        raise SubmitError(f"cannot reach the Ray job server at {address}: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most ~400 characters (its type name if empty)."""
    text = " ".join(str(exc).split())
    return (text[:400] + "...") if len(text) > 400 else text or type(exc).__name__


# ------------------------------------------------------------------------------------------------
# Staging

@dataclass
class Staged:
    directory: Path
    config: dict[str, Any]
    files: list[str]          # original local paths that were copied
    bytes: int                # size of the staged working_dir

    @property
    def entrypoint_config(self) -> str:
        return STAGED_CONFIG


def _local_file_ref(value: str) -> tuple[Path, str] | None:
    """(local file, suffix) if ``value`` names an existing local file, e.g. 'd.jsonl' or 'r.py:fn'."""
    if not value or value.startswith("rayrl:") or "://" in value:
        return None
    candidate, suffix = value, ""
    if ".py:" in value:
        candidate, _, name = value.rpartition(":")
        suffix = ":" + name
    path = Path(candidate).expanduser()
    return (path, suffix) if path.is_file() else None


def stage(config, directory: str | Path) -> Staged:
    """Write the resolved ``config`` and the local files it names into ``directory``."""
    directory = Path(directory)
    (directory / FILES_DIR).mkdir(parents=True, exist_ok=True)
    data = config_to_dict(config)
    copied: dict[Path, str] = {}
    originals: list[str] = []

    def rewrite(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {k: rewrite(v, f"{key}.{k}" if key else k) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v, f"{key}.{i}") for i, v in enumerate(node)]
        if not isinstance(node, str) or key in ("output_dir", "model.path"):
            return node
        ref = _local_file_ref(node)
        if ref is None:
            return node
        path, suffix = ref
        real = path.resolve()
        if real not in copied:
            target = Path(FILES_DIR) / str(len(copied)) / path.name
            (directory / target).parent.mkdir(parents=True)
            shutil.copy2(real, directory / target)
            copied[real] = target.as_posix()
            originals.append(str(path))
        return copied[real] + suffix

    data = rewrite(data, "")
    # The job's cwd is a temporary copy of the working_dir: results and local models must be named
    # by absolute paths (a shared filesystem), never relative to it.
    data["output_dir"] = str(Path(data["output_dir"]).expanduser().absolute())
    model_path = data.get("model", {}).get("path")
    if isinstance(model_path, str) and Path(model_path).expanduser().exists():
        data["model"]["path"] = str(Path(model_path).expanduser().absolute())
    # Join the job's cluster rather than starting an embedded one inside the job.
    if data.get("ray", {}).get("address") is None:
        data.setdefault("ray", {})["address"] = "auto"
    (directory / STAGED_CONFIG).write_text(
        "# written by `rayrl submit`: the resolved config, local files staged under files/\n"
        + yaml.safe_dump(data, sort_keys=False))
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return Staged(directory, data, originals, size)


def job_env(extra: list[str] | None = None) -> dict[str, str]:
    """The job's env_vars: pass-through variables set here, plus ``--env KEY`` / ``--env KEY=VALUE``."""
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The stage's driver calls ray.init(runtime_env={"env_vars": ...}) with some of the same keys;
    # without this Ray refuses to merge that with the job's runtime env.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not key:
            raise SubmitError(f"--env {item!r}: expected KEY or KEY=VALUE")
        if not sep:
            if key not in os.environ:
                raise SubmitError(f"--env {key}: not set in this environment")
            value = os.environ[key]
        env[key] = value
    return env


def new_job_id(algorithm: str) -> str:
    return f"rayrl-{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@dataclass
class Submission:
    job_id: str
    staged: Staged
    submit_time: float
    client: Any = None


def submit(config_path: str, overrides: list[str], *, address: str | None, python: str = "python",
           env: list[str] | None = None, job_id: str | None = None, entrypoint_num_cpus: float = 0,
           keep_staged: str | None = None, client_=None) -> Submission:
    """Validate, stage and submit; returns the job id. Config errors raise ConfigError (nothing sent)."""
    config = load_config(config_path, overrides)  # same errors as `rayrl train`
    env_vars = job_env(env)
    jobs = client_ or client(address)
    check_cluster_imports_rayrl(jobs, python, env_vars)
    tmp = Path(keep_staged) if keep_staged else Path(tempfile.mkdtemp(prefix="rayrl-submit-"))
    try:
        staged = stage(config, tmp)
        job_id = job_id or new_job_id(config.algorithm)
        start = time.time()
        try:
            jobs.submit_job(
                entrypoint=f"{python} -m rayrl.cli train {STAGED_CONFIG}",
                submission_id=job_id,
                runtime_env={"working_dir": str(tmp), "env_vars": env_vars},
                metadata={"rayrl_config": os.path.basename(config_path), "output_dir": staged.config["output_dir"],
                          "algorithm": config.algorithm},
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
        except Exception as exc:
            raise SubmitError(f"job submission failed: {one_line(exc)}") from None
        return Submission(job_id, staged, start, jobs)
    finally:
        if not keep_staged:  # the SDK has uploaded its own zip of working_dir by now
            shutil.rmtree(tmp, ignore_errors=True)


# How long a short job (the probe that checks the cluster's Python, a scale request) may take.
PROBE_DEADLINE_S = 120.0
# How long after deleting a short job to watch for Ray's job monitor writing it back (3 monitor periods).
PROBE_RESURRECTION_WATCH_S = 3.0
_PROBE = "import rayrl, sys; print('rayrl', rayrl.__file__, 'python', sys.version.split()[0])"


def run_short_job(jobs, job_id: str, entrypoint: str, env_vars: dict[str, str], metadata: dict[str, str], *,
                  deadline_s: float, what: str) -> tuple[str, str]:
    """Run ``entrypoint`` as a job on the cluster, wait for it (up to ``deadline_s``) and delete it:
    ``(final status, its log)``. ``what`` names the job in errors."""
    try:
        jobs.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env={"env_vars": env_vars},
                        metadata=metadata)
    except Exception as exc:
        raise SubmitError(f"job submission failed: {one_line(exc)}") from None
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            status = jobs.get_job_status(job_id)
            status = str(getattr(status, "value", status))
            if status in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise SubmitError(f"the cluster did not run {what} within {deadline_s:g} s; "
                                  "is it short of CPUs for a job driver?")
            time.sleep(0.5)
        return status, jobs.get_job_logs(job_id)
    finally:
        _delete_job(jobs, job_id)


def last_line(log: str) -> str:
    said = [line for line in log.splitlines() if line.strip()]
    return mask_secrets(said[-1]) if said else ""


def check_cluster_imports_rayrl(jobs, python: str, env_vars: dict[str, str],
                                deadline_s: float = PROBE_DEADLINE_S) -> None:
    """Run ``python -c 'import rayrl'`` as a short job on the cluster before the real one, so that a
    cluster whose Python lacks rayrl is a clear error here, not a job that fails inside the cluster with
    "No module named 'rayrl'". The probe job is deleted afterwards."""
    status, log = run_short_job(jobs, f"rayrl-probe-{uuid.uuid4().hex[:8]}", f"{python} -c {shlex.quote(_PROBE)}",
                                env_vars, {"rayrl_probe": "1"}, deadline_s=deadline_s,
                                what=f"a probe job ({python} -c 'import rayrl')")
    if status != "SUCCEEDED":
        raise SubmitError(f"the cluster's {python!r} cannot import rayrl ({last_line(log) or status}); "
                          "install rayrl on the cluster's nodes, or name their interpreter with --python")


def request_scale_on_cluster(target: str, overrides: list[str], *, address: str | None, python: str = "python",
                             client_=None, deadline_s: float = PROBE_DEADLINE_S) -> tuple[str, int]:
    """``rayrl scale --address``: the scale request written on the cluster's side by a short job running
    ``rayrl scale`` there (a submitted run's output_dir is on storage the cluster sees, this machine
    may not). ``target``: the run's output_dir, or the id of the job ``rayrl submit`` started (its
    output_dir is in the job's metadata). Returns ``(output_dir, N)``; the cluster's refusal (no run
    there, a colocated run, ...) is raised as ``SubmitError`` with its message."""
    count = parse_scale_request(overrides)  # a malformed request is refused before anything is sent
    jobs = client_ or client(address)
    output_dir = target
    try:
        info = jobs.get_job_info(target)
    except Exception:  # noqa: BLE001 - not a job id: the output_dir itself
        info = None
    if info is not None:
        output_dir = (getattr(info, "metadata", None) or {}).get("output_dir")
        if not output_dir:
            raise SubmitError(f"scale: job {target} was not started by `rayrl submit` (no output_dir in its metadata)")
    entrypoint = f"{python} -m rayrl.cli scale {shlex.quote(output_dir)} {SCALABLE_KEY}={count}"
    status, log = run_short_job(jobs, f"rayrl-scale-{uuid.uuid4().hex[:8]}", entrypoint, job_env(),
                                {"rayrl_scale": output_dir}, deadline_s=deadline_s,
                                what=f"the scale request job ({entrypoint})")
    if status != "SUCCEEDED":
        raise SubmitError(f"the cluster did not take the scale request: {last_line(log) or status}")
    return output_dir, count


def _delete_job(jobs, job_id: str) -> None:
    """Stop a short job if it still runs, wait (briefly) for it to end, and delete it. Best effort: a
    job that cannot be deleted only clutters `rayrl jobs list`."""
    try:
        status = jobs.get_job_status(job_id)
        if str(getattr(status, "value", status)) not in TERMINAL:
            jobs.stop_job(job_id)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = jobs.get_job_status(job_id)
                if str(getattr(status, "value", status)) in TERMINAL:
                    break
                time.sleep(0.5)
        jobs.delete_job(job_id)
        # Ray's job monitor polls each second; if it looks after the delete but before it notices the
        # supervisor's exit, it writes the job back as "supervisor died". Delete that resurrection too.
        deadline = time.monotonic() + PROBE_RESURRECTION_WATCH_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                jobs.get_job_status(job_id)
            except RuntimeError:  # gone (the client raises on "not found")
                continue
            jobs.delete_job(job_id)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        print(f"rayrl: note: could not delete the job {job_id}: {one_line(exc)}", file=sys.stderr)


def mask_secrets(text: str) -> str:
    """``text`` with the values of this shell's secret variables (:data:`SECRET_ENV`) replaced by ``***``."""
    for key in SECRET_ENV:
        value = os.environ.get(key)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def wait(jobs, job_id: str, *, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends (secrets of this shell masked); returns the final status."""
    out = out or sys.stdout
    shown = 0
    while True:
        status = jobs.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        logs = jobs.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(mask_secrets(logs[shown:]))
            out.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------
# `rayrl jobs ...`

def redact(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    if not runtime_env:
        return runtime_env
    env = dict(runtime_env)
    if isinstance(env.get("env_vars"), dict):
        env["env_vars"] = {k: ("***" if k in SECRET_ENV or "KEY" in k or "TOKEN" in k or "SECRET" in k else v)
                           for k, v in env["env_vars"].items()}
    return env


def job_summary(info) -> dict[str, Any]:
    def when(ms):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None

    return {"job_id": info.submission_id or info.job_id, "status": str(getattr(info.status, "value", info.status)),
            "entrypoint": info.entrypoint, "message": mask_secrets(info.message or ""), "start": when(info.start_time),
            "end": when(info.end_time), "driver_exit_code": getattr(info, "driver_exit_code", None),
            "metadata": info.metadata or {}, "runtime_env": redact(info.runtime_env)}


# ------------------------------------------------------------------------------------------------
# A private single-node head on loopback (tests, benchmarks, trying `rayrl submit` on a laptop)

def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held bound until all are picked (one at a time, the kernel
    may hand the same free port out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class LocalHead:
    process: Any
    address: str          # the job server, http://127.0.0.1:PORT
    gcs_address: str
    temp_dir: str

    def stop(self, timeout: float = 60) -> None:
        """Stop this head only (``ray stop`` would kill every Ray cluster on the machine)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` tears its node down
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # stragglers in its own process group (started with start_new_session)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_head(*, num_cpus: int = 2, ray: str | None = None, env: dict[str, str] | None = None,
                     drop_env: tuple[str, ...] = ("RAY_ADDRESS",), timeout: float = 120) -> LocalHead:
    """``ray start --head --block`` on 127.0.0.1 with its own free ports and temp dir (token auth as
    Ray defaults). Waits until the job server answers."""
    ray = ray or str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="rrh", dir="/tmp")  # short: Ray's socket paths have a length limit
    names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")
    ports = dict(zip(names, _free_ports(len(names))))
    cmd = [ray, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           *(f"--{name}={port}" for name, port in ports.items())]
    full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    full_env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})})
    log = open(Path(temp_dir) / "ray_start.log", "w")
    process = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(process, f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}", temp_dir)
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if process.poll() is not None:
            text = (Path(temp_dir) / "ray_start.log").read_text()[-3000:]
            head.stop()
            raise SubmitError(f"ray start exited with {process.returncode}:\n{text}")
        try:
            client(head.address).list_jobs()
            if _agent_ready(head):
                return head
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(1)
    head.stop()
    raise SubmitError(f"the head's job server did not come up in {timeout:.0f}s: {last}")


def _agent_ready(head: LocalHead) -> bool:
    """The job server accepts jobs only once the node's dashboard agent is up."""
    import urllib.request  # slow: ~30 ms (http.client, email) that `rayrl --help` need not pay

    request = urllib.request.Request(head.address + "/api/component_activities", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except Exception:
        return False
    logs = Path(head.temp_dir) / "session_latest" / "logs" / "dashboard_agent.log"
    return logs.is_file() and "address already in use" not in logs.read_text()
