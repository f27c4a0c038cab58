"""A Ray Train callback, run on its controller: why each attempt of a run ended (a worker lost, an error),
appended to <run_dir>/failures.jsonl for the manifest's attempts and the message when restarts run out.
Its own module: importing it imports ray.train, which the controller's other commands never need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from jobs import attempts


class FailureRecorder(UserCallback):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        attempts.record_failure(Path(self.run_dir), worker_exceptions)
