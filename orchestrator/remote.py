"""Talking to a Ray cluster's Jobs API: address and token resolution, the plain-http guard, the submission
package (code + resolved job + shipped inputs), and submit / status / logs / stop / list.

The token is sent as `Authorization: Bearer ...` and never printed, logged, or written into the package,
the job's metadata or its runtime_env.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator import dotted, rundir
from orchestrator.config import JobConfig, to_yaml

INPUTS_OK = "rayft: inputs ok"
"""The line the entrypoint prints once the model and data are readable on the cluster (submit waits for it)."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_RETRIES, AGENT_WAIT_S = 15, 2.0  # a new cluster's Jobs API may lack a dashboard agent for a few seconds
CODE_PACKAGES = ("orchestrator", "jobs")


class RemoteError(RuntimeError):
    """A problem talking to the cluster; the message names the fix (and never holds the token)."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str
    """Where it came from (an env var name or a file path): what error messages may show."""


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RemoteError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise RemoteError(f"{address}: give the cluster's dashboard (Jobs API) address, e.g. http://HOST:8265")
    return address.rstrip("/")


def resolve_token(address: str, dev_cluster: Token | None = None) -> Token | None:
    """RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else dev_cluster (the token of the `rayft cluster up`
    cluster at this address, which the caller looks up with orchestrator.cluster.token_for), else Ray's
    default token file (~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise RemoteError(f"RAY_AUTH_TOKEN_PATH={path}: no such file")
        return Token(path.read_text().strip(), str(path))
    if dev_cluster is not None:
        return dev_cluster
    default = Path("~/.ray/auth_token").expanduser()
    if default.is_file():
        return Token(default.read_text().strip(), str(default))
    return None


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(address: str, token: Token | None, insecure: bool) -> list[str]:
    """Refuse plain http to a non-loopback address without a token (unless --insecure); returns warnings."""
    if address.startswith("https://") or is_loopback(address):
        return []
    if token is None and not insecure:
        raise RemoteError(
            f"refusing to submit to {address} over plain http without a token: anyone who can reach it can run code "
            "on the cluster. Set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the cluster's token), use an https address, "
            "or pass --insecure if the network is private"
        )
    if token is not None:
        return [f"the token goes to {address} over plain http; prefer https (or a tunnel) outside a private network"]
    return []


def _redact(text: str, token: Token | None) -> str:
    return text.replace(token.value, "<token>") if token and token.value else text


def _auth_problem(status: int, address: str, token: Token | None) -> RemoteError:
    if status == 401:
        return RemoteError(
            f"{address} requires a token (HTTP 401) and none was found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "to the cluster's token (`rayft cluster up` writes it to <cluster dir>/auth_token)"
        )
    source = token.source if token else "nowhere"
    return RemoteError(
        f"{address} rejected the token from {source} (HTTP 403): it is not this cluster's token; "
        "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the token the cluster was started with"
    )


def http_get_json(address: str, path: str, token: Token | None, timeout: float = 10) -> Any:
    request = urllib.request.Request(address + path, headers={"Authorization": f"Bearer {token.value}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise _auth_problem(e.code, address, token) from None
        raise RemoteError(f"{address}{path}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RemoteError(f"cannot reach {address} ({getattr(e, 'reason', e)}); is the cluster up? (rayft cluster status)") from None


def list_nodes(address: str, token: str | Token | None) -> list[dict[str, Any]]:
    if isinstance(token, str):
        token = Token(token, "the cluster directory")
    body = http_get_json(address, "/api/v0/nodes?limit=1000", token)
    return body["data"]["result"]["result"]


def client(address: str, token: Token | None) -> Any:
    """A JobSubmissionClient that sends the bearer token; connection and auth errors name the fix."""
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # not Ray's "Uploading package ..." INFO lines
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:
        text = str(e)
        if "401" in text or "Authentication required" in text or "couldn't find an authentication token" in text:
            raise _auth_problem(401, address, token) from None
        if "403" in text or "Authentication failed" in text:
            raise _auth_problem(403, address, token) from None
        raise RemoteError(f"cannot reach the Jobs API at {address}: {_redact(text, token).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------------
# The submission package


@dataclass(frozen=True)
class Package:
    directory: Path
    run_location: str
    """Where the job's run directory will be: a path on the cluster or a URI."""
    shipped_mib: float


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def build_package(job: JobConfig, stamp: str) -> Package:
    """A working_dir for the Ray job: the rayft code, the shipped inputs, and job.yaml pointing at them."""
    import orchestrator

    ship: dict[str, Path] = {}  # package-relative name -> source directory
    rewrites: dict[str, str] = {}  # job key -> package-relative path
    if "model" in job.submit.ship and Path(job.model).is_dir():
        ship["inputs/model"] = Path(job.model)
        rewrites["model"] = "inputs/model"
    if "data" in job.submit.ship:
        dirs: dict[Path, str] = {}
        for key in ("train", "eval"):
            value = getattr(job.data, key)
            if value is None:
                continue
            parent = Path(value).parent
            name = dirs.setdefault(parent, f"inputs/data-{len(dirs)}")
            ship[name] = parent
            rewrites[f"data.{key}"] = f"{name}/{Path(value).name}"
    total = sum(_size(p) for p in ship.values())
    if total > job.submit.max_ship_mib * 2**20:
        listing = ", ".join(f"{p} ({_size(p) / 2**20:.0f} MiB)" for p in ship.values())
        raise RemoteError(
            f"submit.ship would pack {total / 2**20:.0f} MiB ({listing}), over submit.max_ship_mib={job.submit.max_ship_mib}: "
            "put the inputs on storage the cluster reads and drop them from submit.ship, or raise submit.max_ship_mib"
        )
    directory = Path(tempfile.mkdtemp(prefix="rayft-submit-"))
    code_root = Path(orchestrator.__file__).resolve().parent.parent
    for name in CODE_PACKAGES:
        shutil.copytree(code_root / name, directory / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name, source in ship.items():
        shutil.copytree(source, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
    raw = job.model_dump(mode="json")
    for key, value in rewrites.items():
        dotted.set_in(raw, key, value)
    raw["tune"] = None
    (directory / "job.yaml").write_text(to_yaml(JobConfig.model_validate(raw)))
    storage = job.submit.storage_path or job.output
    run_location = f"{storage.rstrip('/')}/{rundir.run_name(job.name, stamp)}"
    return Package(directory, run_location, round(total / 2**20, 2))


def entrypoint(run_location: str) -> str:
    """The command the cluster runs in the package's directory (cluster/rayjob.yaml runs the same)."""
    return f"python -m jobs.entrypoint job.yaml --run-dir {run_location}"


def submit(job: JobConfig, address: str, token: Token | None, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    from jobs.tracking import SECRET_VARS

    # what trackers authenticate with comes from the cluster's own environment (a Kubernetes Secret in the
    # RayCluster's env, the head node's profile), never the submission: Ray keeps a runtime_env in its job table
    carried = sorted(set((runtime_env or {}).get("env_vars") or {}) & set(SECRET_VARS))
    if carried:
        raise RemoteError(
            f"the runtime_env sets {', '.join(carried)}: a submission's runtime_env is stored in the cluster's job table and "
            "shown on its dashboard; set it in the cluster's own environment instead (e.g. a Kubernetes Secret in the "
            "RayCluster's env) and remove it from the runtime_env"
        )
    stamp = rundir.stamp()
    package = build_package(job, stamp)
    env = dict(runtime_env or {})
    # `rayft stop` (Ray's stop_job) SIGTERMs the driver and SIGKILLs it 3 s later unless told otherwise: give
    # it the run's grace period to checkpoint its current step
    grace = {"RAY_JOB_STOP_WAIT_TIME_S": str(int(job.scaling.stop_grace_s) + 30)}
    env_vars = {**grace, **env.get("env_vars", {}), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env = {**env, "working_dir": str(package.directory), "env_vars": env_vars}
    submission_id = f"rayft-{rundir.run_name(job.name, stamp)}-{secrets.token_hex(2)}"
    jobs = client(address, token)
    try:
        for attempt in range(AGENT_RETRIES + 1):
            try:
                jobs.submit_job(
                    entrypoint=entrypoint(package.run_location),
                    submission_id=submission_id,
                    runtime_env=env,
                    metadata={"rayft_job": job.name, "rayft_results": package.run_location},
                )
                break
            except Exception as e:
                # A cluster just started answers HTTP 500 "No available agent to submit job, please try again
                # later" until a node's dashboard agent has registered (seen here under load): wait and retry.
                if "No available agent" in str(e) and attempt < AGENT_RETRIES:
                    time.sleep(AGENT_WAIT_S)
                    continue
                raise RemoteError(f"submission to {address} failed: {_redact(str(e), token).splitlines()[0]}") from None
    finally:
        shutil.rmtree(package.directory, ignore_errors=True)
    return {"job_id": submission_id, "results": package.run_location, "shipped_mib": package.shipped_mib, "address": address}


def wait_until_running(address: str, token: Token | None, job_id: str, timeout_s: float) -> float:
    """Seconds until the entrypoint reported its inputs readable; raises with the job's own words if it
    failed first (an input the cluster cannot reach fails here, at submit time)."""
    jobs = client(address, token)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        status = str(jobs.get_job_status(job_id).value)
        logs = jobs.get_job_logs(job_id)
        if INPUTS_OK in logs:
            return time.time() - t0
        if status in TERMINAL:
            tail = "\n".join(logs.strip().splitlines()[-15:])
            raise RemoteError(f"job {job_id} {status} before training started:\n{tail}")
        time.sleep(0.5)
    raise RemoteError(f"job {job_id} did not start within {timeout_s:.0f}s (still {status}); see: rayft logs {job_id}")


def info(address: str, token: Token | None, job_id: str) -> dict[str, Any]:
    jobs = client(address, token)
    try:
        details = jobs.get_job_info(job_id)
    except Exception as e:
        raise RemoteError(f"no job {job_id} on {address}: {_redact(str(e), token).splitlines()[0]}") from None
    return _row(details)


def _row(details: Any) -> dict[str, Any]:
    meta = details.metadata or {}
    return {
        "job_id": details.submission_id or details.job_id,
        "status": str(details.status.value),
        "message": details.message,
        "name": meta.get("rayft_job"),
        "results": meta.get("rayft_results"),
        "start": details.start_time,
        "end": details.end_time,
    }


def list_jobs(address: str, token: Token | None) -> list[dict[str, Any]]:
    return [_row(d) for d in client(address, token).list_jobs()]


def stop(address: str, token: Token | None, job_id: str, timeout_s: float = 60) -> str:
    jobs = client(address, token)
    jobs.stop_job(job_id)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    return status


def logs(address: str, token: Token | None, job_id: str, follow: bool, out: Any) -> None:
    jobs = client(address, token)
    if not follow:
        out.write(jobs.get_job_logs(job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
