"""Processes by PID *and* start time (Linux /proc), so that a reused PID is never signalled; and the
record of the processes an embedded Ray started, so that none outlives the rayft command that started it.

Ray's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) outlive a SIGKILLed driver by minutes: the
driver records its Ray processes when Ray is up (~/.rayft/local-ray/<pid>.json), removes the record when
it shuts Ray down, and every rayft command that starts Ray first stops the processes of records whose
driver is gone (`sweep`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat fields after the command name: [state, ppid, pgrp, ...]; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    fields = stat(pid)
    return fields[19] if fields else None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(pid: int, started: str | None) -> bool:
    """Is pid still the process that started at `started` (and not a zombie)?"""
    fields = stat(pid)
    return bool(fields) and fields[19] == started and fields[0] != "Z"


def descendants(roots: list[int]) -> dict[int, str | None]:
    """Every live descendant of roots -> its start time."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = stat(proc.name)
        if fields:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found: dict[int, str | None] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = start_time(child)
                todo.append(child)
    return found


def stop(processes: dict[int, str | None], timeout_s: float = 10) -> tuple[int, int]:
    """SIGTERM each process still running (same pid and start time), wait up to timeout_s, SIGKILL the rest
    and wait until they are gone. Returns (stopped, of which needed SIGKILL)."""
    alive = {pid: st for pid, st in processes.items() if running(pid, st)}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(running(p, s) for p, s in alive.items()):
        _reap()
        time.sleep(0.2)
    killed = [p for p, s in alive.items() if running(p, s)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(running(p, alive[p]) for p in killed):
        _reap()
        time.sleep(0.1)
    return len(alive), len(killed)


def _reap() -> None:
    """Collect exited children of this process (else they stay zombies)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def records_dir() -> Path:
    return Path(os.environ.get("RAYFT_HOME") or Path.home() / ".rayft") / "local-ray"


def record_local_ray(update_only: bool = False) -> None:
    """Record this process and every process it has started (Ray's GCS, raylet, agents, workers).
    update_only: add the processes started since, if a record exists."""
    me = os.getpid()
    path = records_dir() / f"{me}.json"
    if update_only and not path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(path.read_text())["processes"] if path.is_file() else {}
    known.update({str(pid): st for pid, st in descendants([me]).items() if "ray" in cmdline(pid)})  # Ray's, not others this process runs
    path.write_text(json.dumps({"driver": me, "driver_started": start_time(me), "processes": known}))


def release_local_ray(timeout_s: float = 5) -> tuple[int, int]:
    """After ray.shutdown(): stop what is left of this process's recorded Ray processes; drop the record."""
    path = records_dir() / f"{os.getpid()}.json"
    if not path.is_file():
        return 0, 0
    out = stop({int(p): st for p, st in json.loads(path.read_text())["processes"].items()}, timeout_s)
    path.unlink(missing_ok=True)
    return out


def sweep() -> int:
    """Stop the recorded Ray processes of drivers that are gone (killed); returns how many were stopped."""
    stopped = 0
    for path in sorted(records_dir().glob("*.json")) if records_dir().is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if running(record["driver"], record["driver_started"]):
            continue  # its driver still runs: its Ray is its own
        stopped += stop({int(p): st for p, st in record["processes"].items()})[0]
        path.unlink(missing_ok=True)
    return stopped
