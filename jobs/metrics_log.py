"""RUN_DIR/metrics.jsonl, a run's record: one JSON object a line, appended by rank 0 of the training workers
(jobs/train_loop.py: its start, evals, train-loss windows, checkpoints taken on a stop or a preemption, its
end; every line carries its attempt number) and read back by the driver, the trackers, the reports and the
resume path. The one place that names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: Path) -> Path:
    return run_dir / METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record in run_dir's metrics.jsonl, oldest first; [] if there is none yet."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with metrics_path(run_dir).open("a") as f:
        f.write(json.dumps(record) + "\n")
