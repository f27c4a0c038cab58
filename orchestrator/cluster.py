"""`rayft cluster up|status|down`: a Ray cluster on this machine for development, bound to loopback, with
token authentication on. Each node is a `ray start --block` it launched in its own session; `down` stops
exactly the processes of those nodes, never `ray stop`, which would stop every Ray on the machine.

Which processes are the cluster's: the recorded `ray start` processes (pid *and* start time, so a reused
pid is never taken for one), every descendant of those, every process of their process groups or sessions
(Ray's workers make their own process group but keep the head's session), and every process whose
environment carries this cluster's id (RAYFT_CLUSTER, set by `up`; it finds a job's driver even after the
Ray worker that started it is gone). A process found once is tracked by pid and start time until it exits.

A cluster directory (default ~/.rayft/cluster):
    auth_token      the cluster's token, mode 0600 (never printed)
    cluster.json    addresses, ports, the cluster id and the processes started
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
from typing import Any, NamedTuple

from orchestrator import remote
from orchestrator.processes import free_port
from orchestrator.processes import stat as _stat

STATE = "cluster.json"
TOKEN = "auth_token"
DEFAULT_DIR = Path("~/.rayft/cluster")
MARK = "RAYFT_CLUSTER"
"""Environment variable every process of a cluster inherits: its value is the cluster's id."""
UP_TIMEOUT_S = 300
"""An idle 2-core machine brings 2 nodes up in ~10 s; a busy one has taken ~160 s."""
TERM_GRACE_S = 15
"""How long `down` waits after SIGTERM before it SIGKILLs what is left."""
KILL_WAIT_S = 60
"""How long `down` waits after SIGKILL before it gives up (only a process stuck in the kernel takes that long)."""
LOG_TAIL_LINES = 40


class ClusterError(RuntimeError):
    pass


def default_dir() -> Path:
    return DEFAULT_DIR.expanduser()


def read_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def token_for(address: str, directory: Path | None = None) -> remote.Token | None:
    """The token of the `rayft cluster up` cluster whose dashboard is at address, or None."""
    state = read_state(directory or default_dir())
    if state and state["dashboard"] == address and Path(state["token_path"]).is_file():
        return remote.Token(Path(state["token_path"]).read_text().strip(), state["token_path"])
    return None


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE).write_text(json.dumps(state, indent=2))


# ----------------------------------------------------------------------------------------------------
# Processes, from /proc (Linux)


class Proc(NamedTuple):
    ppid: int
    pgrp: int
    session: int
    started: int  # clock ticks after boot: with the pid, the identity of a process


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _processes() -> dict[int, Proc]:
    """Every process that runs (a zombie has exited: it only waits to be reaped)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields and fields[0] != "Z":
            table[int(entry.name)] = Proc(int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    return table


def _marked(pid: int, cluster_id: str) -> bool:
    try:
        return f"{MARK}={cluster_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def members(state: dict[str, Any], known: dict[int, int] | None = None) -> dict[int, int]:
    """The cluster's live processes (pid -> start time): see the module docstring. `known` are the
    members found by an earlier call; those still running (same start time) stay members."""
    table = _processes()
    found = {pid: t for pid, t in (known or {}).items() if pid in table and table[pid].started == t}
    leaders = set()
    for p in state["processes"]:
        proc = table.get(p["pid"])
        if proc and p.get("started") in (None, proc.started):  # None: a cluster.json from before start times
            found[p["pid"]] = proc.started
        if proc is None or p["pid"] in found:
            # (a pid that runs another process now was reused, so its old group and session are empty: the
            # kernel gives no new process a pid that still names a live group or session. Processes started
            # before the cluster are never members.)
            leaders.add(p["pid"])
    first = min((p["started"] for p in state["processes"] if p.get("started")), default=0)
    for pid, proc in table.items():
        if pid in found or proc.started < first:
            continue
        if proc.pgrp in leaders or proc.session in leaders or ("id" in state and _marked(pid, state["id"])):
            found[pid] = proc.started
    grew = True
    while grew:  # and every descendant of a member
        grew = False
        for pid, proc in table.items():
            if pid not in found and proc.ppid in found:
                found[pid] = proc.started
                grew = True
    return found


def _signal(pid: int, started: int, sig: int) -> bool:
    """Send sig to the process pid only if it is still the one that started at `started`."""
    try:
        fd = os.pidfd_open(pid)  # from here on the signal reaches this process, or none
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds (Linux < 5.3): check, then signal by pid
        with contextlib.suppress(ProcessLookupError):
            if _start_time(pid) == started:
                os.kill(pid, sig)
                return True
        return False
    try:
        if _start_time(pid) != started:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# up / status / down


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(lines[-LOG_TAIL_LINES:]) if lines else "(empty)"


def up(directory: Path, *, nodes: int = 1, cpus_per_node: int | None = None, port: int = 6379, dashboard_port: int = 8265,
       timeout_s: float = UP_TIMEOUT_S) -> dict[str, Any]:
    """Start a head (and nodes - 1 worker nodes) on 127.0.0.1 and wait, at most timeout_s in all, until every
    node is ALIVE. On failure: stop everything it started, then raise naming the node that failed and its log."""
    directory.mkdir(parents=True, exist_ok=True)
    state = read_state(directory)
    if state and members(state):
        raise ClusterError(f"a cluster from {directory} is already up ({state['dashboard']}); stop it with: rayft cluster down --dir {directory}")
    token_path = directory / TOKEN
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token_path, 0o600)
    token = remote.Token(token_path.read_text().strip(), str(token_path))
    # Ray's sockets live under its temp dir, whose path must stay short (unix socket paths max ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayft-")
    state = {
        "id": secrets.token_hex(8),
        "gcs": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "token_path": str(token_path),
        "temp_dir": temp_dir,
        "processes": [],
        "started": time.time(),
    }
    env = {
        **os.environ,
        MARK: state["id"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        # on SIGTERM a node first drains (waits for its workers to go idle, up to 30 s): nothing here
        # needs that, and `down` should not wait for it
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    # the cluster runs the Python rayft runs (a job's `python` is the first on PATH)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the cluster's token
    env.pop("RAY_ADDRESS", None)
    cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // nodes)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats", "--log-color=false"]  # plain logs to print
    head = ["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}"]
    popens: dict[str, subprocess.Popen] = {}

    def launch(role: str, args: list[str]) -> None:
        with (directory / f"{role}.log").open("w") as log:  # the child holds its own copy of the file
            # the job agent's HTTP port is 52365 unless told: an embedded Ray elsewhere on the machine (a
            # `rayft train`) holds that one, and then job submission fails with "No available agent"
            agent = f"--dashboard-agent-listen-port={free_port()}"
            proc = subprocess.Popen([_ray_bin(), "start", *args, f"--node-name={role}", agent, *common], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        popens[role] = proc
        state["processes"].append({"pid": proc.pid, "pgid": proc.pid, "started": _start_time(proc.pid), "role": role, "log": f"{role}.log"})
        _write_state(directory, state)

    t0 = time.time()
    deadline = t0 + timeout_s
    _write_state(directory, state)
    try:
        launch("head", head)
        _wait(["head"], popens, state, token, t0, deadline)
        for i in range(1, nodes):
            launch(f"node-{i}", [f"--address=127.0.0.1:{port}"])
        _wait(list(popens), popens, state, token, t0, deadline)
    except BaseException as e:
        reason = e.reason if isinstance(e, _NodeFailed) else str(e)
        try:
            stopped = down(directory)
        except ClusterError as stuck:
            raise ClusterError(f"{reason}; then stopping what had started failed: {stuck}") from e
        finally:
            for proc in popens.values():  # reap our children
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
        if isinstance(e, _NodeFailed):
            log = directory / f"{e.role}.log"
            raise ClusterError(f"{reason}; stopped what had started ({stopped['processes']} processes, all exited). {log} ends:\n{_tail(log)}") from None
        raise
    state["up_s"] = round(time.time() - t0, 1)
    _write_state(directory, state)
    return state


class _NodeFailed(Exception):
    def __init__(self, role: str, reason: str) -> None:
        super().__init__(reason)
        self.role, self.reason = role, reason


def _wait(roles: list[str], popens: dict[str, subprocess.Popen], state: dict[str, Any], token: remote.Token, t0: float, deadline: float) -> None:
    """Until every node of roles is ALIVE; raises _NodeFailed for a node whose `ray start` exited or that
    is not ALIVE by the deadline."""
    alive: set[str] = set()
    while True:
        for role in roles:
            code = popens[role].poll()
            if code is not None:
                raise _NodeFailed(role, f"{role}'s `ray start` exited with code {code} after {time.time() - t0:.0f}s")
        try:
            body = remote.http_get_json(state["dashboard"], "/api/v0/nodes?limit=1000", token, timeout=max(0.5, min(10, deadline - time.time())))
            alive = {n.get("node_name") for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"}
        except remote.RemoteError:
            pass  # the head's dashboard is not up yet
        if alive.issuperset(roles):
            return
        if time.time() >= deadline:
            late = next(r for r in roles if r not in alive)
            raise _NodeFailed(late, f"{late} did not come up within {deadline - t0:g}s (rayft cluster up --timeout SECONDS to wait longer)")
        time.sleep(0.5)


def status(directory: Path) -> dict[str, Any]:
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}; start one with: rayft cluster up")
    token = Path(state["token_path"]).read_text().strip()
    nodes = remote.list_nodes(state["dashboard"], token)
    return {**state, "nodes": nodes}


def down(directory: Path, grace_s: float = TERM_GRACE_S) -> dict[str, Any]:
    """SIGTERM the nodes' `ray start` processes (each shuts its node down), SIGTERM what else of the cluster
    runs once those have exited, SIGKILL what is left after grace_s; returns only when every process of the
    cluster has exited: {"nodes", "processes": how many exited, "killed": how many needed SIGKILL, "down_s"}."""
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}")
    t0 = time.time()
    live = members(state)
    seen = dict(live)
    termed = set()

    def term(pids: dict[int, int]) -> None:
        for pid, started in pids.items():
            if pid not in termed and _signal(pid, started, signal.SIGTERM):
                termed.add(pid)

    roots = {p["pid"] for p in state["processes"]}
    term({p["pid"]: live[p["pid"]] for p in reversed(state["processes"]) if p["pid"] in live})  # worker nodes first, the head last
    while live and time.time() < t0 + grace_s:
        time.sleep(0.2)
        live = members(state, live)
        seen.update(live)
        if not roots & live.keys():  # the nodes are down: what is left, Ray did not stop
            term(live)
    killed = set()
    deadline = time.time() + KILL_WAIT_S
    while live:
        for pid, started in live.items():
            if pid not in killed and _signal(pid, started, signal.SIGKILL):
                killed.add(pid)
        if time.time() > deadline:
            raise ClusterError(f"processes {sorted(live)} of the cluster still run {KILL_WAIT_S}s after SIGKILL; "
                               f"run `rayft cluster down --dir {directory}` again")
        time.sleep(0.1)
        live = members(state, live)
        seen.update(live)
    for pid in roots:  # reap the nodes' `ray start` (when this process started them)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    (directory / STATE).unlink()
    return {"nodes": len(state["processes"]), "processes": len(seen), "killed": len(killed), "down_s": round(time.time() - t0, 1)}
