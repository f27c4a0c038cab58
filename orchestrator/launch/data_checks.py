"""The controller's data checks before training: the preflight (jobs/preflight.py), the validation pass over
every row (checked, or DataPass on a thread for small files) and `rayft validate`'s (validate_data)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.launch.capacity import training_cpus
from orchestrator.launch.localray import ensure_local_ray, output_to, shutdown_ray


def data_cache(job: JobConfig, run_dir: Path | None = None) -> Path:
    """Where row stores and validation indexes live: beside the run directories, shared by runs and resumes."""
    from jobs.driver import DATA_CACHE

    return (run_dir.parent if run_dir is not None else Path(job.output)) / DATA_CACHE


def preflight(job: JobConfig, cache: Path, strict: bool = False) -> Any:
    """The controller's checks (jobs/preflight.py; `rayft train` runs them on a thread while Ray starts): each
    data file parses, has the job's columns and rows; the model's config and processor load and its chat
    template encodes a row. Returns (row stores, problems of files that have none), or with strict the
    stores, raising DataError for any problem. Every row is then checked (jobs/stream.py: index) before
    the first step; checked() reports its problems with these."""
    from jobs import preflight as checks

    return checks.checked_stores(job, cache) if strict else checks.check(job, cache)


def checked(job: JobConfig, stores: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The validation pass over the stores, raising DataError with its problems and the preflight's, all at once."""
    from jobs.data import DataError
    from jobs.stream import index

    try:
        indexes = index(job, stores)
    except DataError as e:
        raise DataError(problems + e.problems) from None
    if problems:
        raise DataError(problems)
    return indexes


class DataPass:
    """The preflight and, for data small enough to need no Ray (jobs/stream.py: in_process), checked() and
    encode_once(), on a thread of this process: started at once, so that they run while Ray starts (the
    preflight alone spends seconds importing transformers and loading the processor); joined by result()."""

    def __init__(self, job: JobConfig, cache: Path):
        self._out: tuple[Any, ...] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job, cache), daemon=True)
        self._thread.start()

    def _run(self, job: JobConfig, cache: Path) -> None:
        from jobs.encoded import encode_once
        from jobs.stream import all_in_process

        try:
            stores, problems = preflight(job, cache)
            done = None
            if all_in_process(stores):
                indexes = checked(job, stores, problems)
                at = time.time()
                indexes, said = encode_once(job, indexes)
                done = (indexes, said, at)
            self._out = (stores, problems, done)
        except BaseException as e:  # raised again in the caller's thread
            self._error = e

    def result(self) -> tuple[dict[str, Any], list[str], tuple[dict[str, Any], dict[str, str], float] | None]:
        """(row stores, the preflight's problems, and for small data (indexes with their encoded rows, what
        encode-once did per file, when the rows were checked); None where the rows are Ray Data's to check)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out  # type: ignore[return-value]


def validate_data(job: JobConfig) -> dict[str, dict[str, int]]:
    """`rayft validate`'s data checks: the same preflight and validation pass as `rayft train` (whose index
    a later run reuses), on an embedded Ray whose output goes to <output>/.rayft-data/validate.log. Returns
    per file (train, eval): rows usable, rows dropped (data.too_long: drop), the longest row in tokens and what
    the images take (stream.image_token_summary, None for a text model);
    raises DataError naming every problem."""
    from jobs.stream import all_in_process

    cache = data_cache(job)
    stores, problems = preflight(job, cache)
    if all_in_process(stores):  # small files: checked here, no Ray started
        indexes = checked(job, stores, problems)
    else:
        cache.mkdir(parents=True, exist_ok=True)
        with output_to(cache / "validate.log"):
            started = ensure_local_ray(training_cpus(job))
            try:
                indexes = checked(job, stores, problems)
            finally:
                if started:
                    shutdown_ray()
    from jobs.stream import image_token_summary

    return {which: {"rows": len(ix.rows), "dropped": ix.dropped, "longest": int(ix.lengths.max()) if len(ix.lengths) else 0,
                    "images": image_token_summary(ix)} for which, ix in indexes.items()}
