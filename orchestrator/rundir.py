"""Run directories: the one namer of runs (<name>-<timestamp>: run_name) and of their directories
(<output>/<run name>, -2, -3, ... on a collision: new_dir) for runs and searches. A submission's run is named
here too; its directory is on the cluster's storage (orchestrator/remote.py). What a run directory holds is
named where it is written: metrics.jsonl in jobs/metrics_log.py, checkpoints in jobs/checkpoint.py. Below
launch, search, remote and the reports."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path


def stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def run_name(name: str, stamp: str) -> str:
    """What a run started at `stamp` is called: its directory's name, here or on a cluster's storage."""
    return f"{name}-{stamp}"


def new_dir(parent: Path, name: str) -> Path:
    """A new, empty parent/<name>-<stamp> (or -2, -3, ...: two runs started in the same second, or by two
    processes at once, never share one), made here; resolved."""
    base = parent / run_name(name, stamp())
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            n += 1
            continue
        return candidate.resolve()
