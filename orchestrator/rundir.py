"""Run directories: the one namer (<output>/<name>-<timestamp>, -2, -3, ... on a collision) for runs and
searches (a submission takes only its stamp: its run directory is on the cluster's storage), and a run's record as the controller reads it back (metrics.jsonl, one JSON
object per report, written by jobs/train_loop.py). Below launch, search and the reports."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def new_dir(parent: Path, name: str) -> Path:
    """A new, empty parent/<name>-<stamp> (or -2, -3, ...: two runs started in the same second, or by two
    processes at once, never share one), made here; resolved."""
    base = parent / f"{name}-{stamp()}"
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
