"""`rayft cluster up|status|down`: a Ray cluster on this machine for development, bound to loopback, with
token authentication on. Every process it starts is a `ray start --block` it launched in its own process
group; `down` signals exactly those groups (recorded in cluster.json), never `ray stop`, which would stop
every Ray on the machine.

A cluster directory (default ~/.rayft/cluster):
    auth_token      the cluster's token, mode 0600 (never printed)
    cluster.json    addresses, ports and the process groups started
    head.log, node-<i>.log
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator import remote

STATE = "cluster.json"
TOKEN = "auth_token"
DEFAULT_DIR = Path("~/.rayft/cluster")


class ClusterError(RuntimeError):
    pass


def default_dir() -> Path:
    return DEFAULT_DIR.expanduser()


def read_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat fields after the command name: [state, ppid, pgrp, ...]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pgid: int) -> bool:
    """Does any process of the group still run? (zombies, which only wait to be reaped, do not count)"""
    for stat in Path("/proc").glob("[0-9]*"):
        fields = _stat(stat.name)
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def up(directory: Path, *, nodes: int = 1, cpus_per_node: int | None = None, port: int = 6379, dashboard_port: int = 8265, timeout_s: float = 90) -> dict[str, Any]:
    """Start a head (and nodes - 1 worker nodes) on 127.0.0.1 and wait until the dashboard answers."""
    directory.mkdir(parents=True, exist_ok=True)
    state = read_state(directory)
    if state and any(_alive(p["pgid"]) for p in state["processes"]):
        raise ClusterError(f"a cluster from {directory} is already up ({state['dashboard']}); stop it with: rayft cluster down --dir {directory}")
    token_path = directory / TOKEN
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token_path, 0o600)
    # Ray's sockets live under its temp dir, whose path must stay short (unix socket paths max ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayft-")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # the cluster runs the Python rayft runs (a job's `python` is the first on PATH)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the cluster's token
    env.pop("RAY_ADDRESS", None)
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // nodes)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats"]
    head_cmd = [_ray_bin(), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                f"--temp-dir={temp_dir}", *common]
    processes = []

    def launch(cmd: list[str], log_name: str) -> None:
        log = (directory / log_name).open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        processes.append({"pid": proc.pid, "pgid": proc.pid, "role": log_name.removesuffix(".log")})

    state = {
        "gcs": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "token_path": str(token_path),
        "temp_dir": temp_dir,
        "processes": processes,
        "started": time.time(),
    }
    t0 = time.time()
    launch(head_cmd, "head.log")
    (directory / STATE).write_text(json.dumps(state, indent=2))
    token = token_path.read_text().strip()
    try:
        _wait(lambda: len(remote.list_nodes(state["dashboard"], token)) >= 1, timeout_s, directory / "head.log")
        for i in range(1, nodes):
            launch([_ray_bin(), "start", f"--address=127.0.0.1:{port}", *common], f"node-{i}.log")
            (directory / STATE).write_text(json.dumps(state, indent=2))
        _wait(lambda: sum(n["state"] == "ALIVE" for n in remote.list_nodes(state["dashboard"], token)) >= nodes, timeout_s, directory / "head.log")
    except BaseException:
        down(directory)
        raise
    state["up_s"] = round(time.time() - t0, 1)
    (directory / STATE).write_text(json.dumps(state, indent=2))
    return state


def _wait(ready: Any, timeout_s: float, log: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if ready():
                return
        except remote.RemoteError:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log.is_file() else ""
    raise ClusterError(f"the cluster did not come up within {timeout_s:.0f}s; {log}:\n{tail}")


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _descendants(roots: list[int]) -> dict[int, str | None]:
    """Every live descendant of roots (Linux /proc) -> its start time."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _stat(proc.name)
        if fields:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found: dict[int, str | None] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = _start_time(child)
                todo.append(child)
    return found


def status(directory: Path) -> dict[str, Any]:
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}; start one with: rayft cluster up")
    token = Path(state["token_path"]).read_text().strip()
    nodes = remote.list_nodes(state["dashboard"], token)
    return {**state, "nodes": nodes}


def down(directory: Path, timeout_s: float = 20) -> list[int]:
    """SIGTERM the recorded process groups, SIGKILL what is left after timeout_s; returns the groups stopped."""
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}")
    groups = [p["pgid"] for p in state["processes"]]
    # Ray workers may leave their node's process group (setsid): find every descendant first.
    descendants = _descendants([p["pid"] for p in state["processes"]])
    for pgid in reversed(groups):  # worker nodes first, the head last
        if _alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(_alive(g) for g in groups):
        time.sleep(0.3)
    for pgid in groups:
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    for pid, started in descendants.items():
        if _start_time(pid) == started:  # still the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pgid in groups:  # reap the direct children (when this process started them)
        try:
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    (directory / STATE).unlink()
    return groups
