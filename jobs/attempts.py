"""Runs that survive: the files the driver and the workers share to stop a run cleanly, to not retry an
error that would repeat, and to tell the attempts of one run apart in its record.

An attempt is one start of the workers: the first, each automatic restart by Ray Train after a worker is
lost (scaling.max_failures), and each `--resume`. Every metrics.jsonl line carries its attempt number.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.metrics_log import read_metrics

STOP_FILE = "stop-requested.json"
"""Written by the driver on SIGTERM/SIGINT: rank 0 sees it after the current step, checkpoints and stops."""
FATAL_FILE = "fatal-error.json"
"""Written by a worker whose error would repeat (a NaN loss, a row that went bad): a restarted attempt
fails at once with the same message instead of loading the model to fail again at the same step."""
CHECKPOINT_PREFIX = "rayft-ckpt-"
"""A worker stages each checkpoint in $TMPDIR/rayft-ckpt-<pid>-<step>-*; removed once Ray Train has it."""


def request_stop(run_dir: Path, reason: str) -> None:
    (run_dir / STOP_FILE).write_text(json.dumps({"reason": reason, "time": time.time()}))


def stop_request(run_dir: Path) -> str | None:
    """The reason a stop was requested, or None."""
    try:
        return json.loads((run_dir / STOP_FILE).read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return None


def clear(run_dir: Path) -> None:
    """A new invocation starts with neither a stop request nor a recorded fatal error."""
    for name in (STOP_FILE, FATAL_FILE):
        (run_dir / name).unlink(missing_ok=True)


def record_fatal(run_dir: Path, message: str) -> None:
    (run_dir / FATAL_FILE).write_text(json.dumps({"message": message, "time": time.time()}))


def fatal(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / FATAL_FILE).read_text())["message"]
    except (OSError, ValueError, KeyError):
        return None


def hog_memory(step: int, rank: int) -> None:
    """The fault drill RAYFT_OOM_AT_STEP=N: rank 0 takes host memory after step N, 256 MiB at a time, until
    Ray's memory monitor kills it (rehearses a worker lost to an out-of-memory kill). It stops short of the
    machine's last 2 GiB: where the monitor is off it fails the run instead of waking the kernel's OOM killer."""
    if rank != 0:
        return
    import psutil

    chunk = 256 * 2**20
    held = []
    while psutil.virtual_memory().available > 2 * 2**30:
        block = bytearray(chunk)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not only reserved
        held.append(block)
        time.sleep(0.05)
    raise RuntimeError(f"RAYFT_OOM_AT_STEP={step}: took {len(held) * chunk / 2**30:.1f} GiB and Ray's memory monitor did not kill this worker")


def staging_dir(step: int, under: str | None = None) -> str:
    """A new directory for one checkpoint of `step`, under `under` (scaling.staging_dir; None: $TMPDIR)."""
    if under is not None:
        Path(under).mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}-{step}-", dir=under)


def sweep_staging(under: str | None = None) -> int:
    """Remove checkpoint staging copies left under `under` ($TMPDIR by default) by workers that were killed
    while writing one (their pid is gone). Returns how many were removed."""
    removed = 0
    for path in Path(under or tempfile.gettempdir()).glob(f"{CHECKPOINT_PREFIX}*"):
        try:
            pid = int(path.name[len(CHECKPOINT_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def next_attempt(records: list[dict[str, Any]]) -> int:
    """1 + the highest attempt in the records (a record of older rayft counts each start as one)."""
    starts = [r for r in records if r.get("event") == "start"]
    return 1 + max((int(r.get("attempt") or i + 1) for i, r in enumerate(starts)), default=0)


def summary(records: list[dict[str, Any]], failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attempt: when it started and ended, the steps it ran (from -> to), its wall time and why it
    ended. failures: the driver's record of why attempts ended (invocations.jsonl), matched by attempt."""
    by_attempt: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if "attempt" in r:
            by_attempt.setdefault(int(r["attempt"]), []).append(r)
    reasons = {int(f["attempt"]): f["reason"] for f in failures if f.get("attempt") is not None}
    out = []
    for n in sorted(by_attempt):
        rs = by_attempt[n]
        start = next((r for r in rs if r.get("event") == "start"), rs[0])
        began = (start.get("clock") or {}).get("worker_started") or start.get("time")
        ended = max((r.get("time") or 0 for r in rs), default=0) or None
        end = next((r for r in rs if r.get("event") in ("end", "stopped")), None)
        if end is not None and end["event"] == "end":
            reason = "completed"
        elif end is not None:
            reason = f"stopped: {end.get('reason')}"
        else:
            reason = reasons.get(n, "ended without a record (the driver was killed?)")
        out.append(
            {
                "attempt": n,
                "from_step": start.get("step", 0),
                "to_step": max((r.get("step") or 0 for r in rs), default=0),
                "start": began,
                "end": ended,
                "wall_s": round(ended - began, 1) if began and ended else None,
                "reason": reason,
            }
        )
    return out


FAILURES_FILE = "failures.jsonl"


def memory_kill(text: str, rank: int | None = None) -> str | None:
    """The sentence for a kill by Ray's memory monitor, from Ray's text about it: which worker, how much memory
    the node had and used, and the threshold (Ray counts every process on the machine, other tenants
    included); None when `text` is about something else."""
    import re

    node = re.search(r"Memory on the node \(IP: ([\w.:-]+), ID: \w+\) was ([\d.]+)GB used / ([\d.]+)GB limit", text)
    if not node:
        return None
    ip, used, limit = node.groups()
    threshold = re.search(r"exceeded threshold of \d+B \(([\d.]+)% of", text)
    worker = re.search(r"task name=RayTrainWorker[^\n]*?pid=(\d+), actual memory used=([\d.]+)GB", text)
    who = f"worker {rank}" if rank is not None else "a worker"
    where = f" (pid {worker.group(1)}, node {ip})" if worker else f" (node {ip})"
    held = f", {worker.group(2)} GB of it in this worker" if worker else ""
    over = f", over Ray's threshold of {threshold.group(1)}% (RAY_memory_usage_threshold)" if threshold else ""
    return (f"{who}{where} was killed by Ray's memory monitor: the node has {limit} GB and its processes used {used} GB{over}{held}; "
            "Ray counts every process on the machine, not only this run's")


def describe(rank: int, error: BaseException) -> str:
    """One sentence on why a worker failed: a lost process (with its pid and node when Ray gives them, and
    Ray's own guess at the cause) or the error it raised."""
    import re

    text = str(error)
    killed = memory_kill(text, rank)
    if killed:
        return killed
    if "actor is dead" in text or "ActorDiedError" in type(error).__name__ or "died unexpectedly" in text:
        pid = re.search(r"\bpid[=:] ?(\d+)", text)  # Ray Train's "pid=N", Ray's actor-death text "pid: N"
        ip = re.search(r"\bip[=:] ?([\d.]+)", text)
        where = ", ".join(x for x in (f"pid {pid.group(1)}" if pid else "", f"node {ip.group(1)}" if ip else "") if x)
        oom = "memory" in text.lower() and "OutOfMemory" in text
        cause = "it was killed by Ray's memory monitor (out of memory)" if oom else "its process died (killed by a signal such as SIGKILL, the OOM killer, or a crash)"
        return f"worker {rank}{f' ({where})' if where else ''} was lost: {cause}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"worker {rank} failed: {type(error).__name__}: {lines[-1] if lines else ''}"


def record_failure(run_dir: Path, worker_exceptions: dict[int, BaseException]) -> None:
    """Append why this attempt ended to failures.jsonl: the attempt is the newest in metrics.jsonl, or the
    next one when that one already has a failure (it died before writing its start)."""
    records = read_metrics(run_dir)
    failed = failures(run_dir)
    attempt = next_attempt(records) - 1 or 1
    if any(f.get("attempt") == attempt for f in failed):
        attempt += 1
    reasons = [describe(rank, e) for rank, e in sorted(worker_exceptions.items())]
    with (run_dir / FAILURES_FILE).open("a") as f:
        f.write(json.dumps({"attempt": attempt, "time": time.time(), "reason": "; ".join(reasons)}) + "\n")


def record_lost(run_dir: Path, reason: str) -> None:
    """Append a failure the workers' callback did not see (Ray's own actors lost with them) to failures.jsonl."""
    attempt = next_attempt(read_metrics(run_dir)) - 1 or 1
    if any(f.get("attempt") == attempt for f in failures(run_dir)):  # it died before writing its start
        attempt += 1
    with (run_dir / FAILURES_FILE).open("a") as f:
        f.write(json.dumps({"attempt": attempt, "time": time.time(), "reason": reason}) + "\n")


def failures(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FAILURES_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


INVOCATIONS_FILE = "invocations.jsonl"


def record_invocation(run_dir: Path, started: float, outcome: str | None = None) -> None:
    """One line when a `rayft train` (or --resume) of run_dir starts, and one when it ends (outcome given)."""
    line = {"pid": os.getpid(), "started": started, **({"ended": time.time(), "outcome": outcome} if outcome else {})}
    with (run_dir / INVOCATIONS_FILE).open("a") as f:
        f.write(json.dumps(line) + "\n")


def invocations(run_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each command that ran run_dir: started, ended, wall_s and outcome. One that was killed (no end line)
    ends at its last metrics.jsonl record."""
    path = run_dir / INVOCATIONS_FILE
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    runs: dict[tuple[int, float], dict[str, Any]] = {}
    for line in lines:
        run = runs.setdefault((line["pid"], line["started"]), {"started": line["started"], "ended": None, "outcome": "killed (no end recorded)"})
        if "ended" in line:
            run.update(ended=line["ended"], outcome=line["outcome"])
    out = sorted(runs.values(), key=lambda r: r["started"])
    for i, run in enumerate(out):
        if run["ended"] is None:
            until = out[i + 1]["started"] if i + 1 < len(out) else float("inf")
            times = [r["time"] for r in records if "time" in r and run["started"] <= r["time"] < until]
            run["ended"] = max(times, default=run["started"])
        run["wall_s"] = round(run["ended"] - run["started"], 1)
    return out
