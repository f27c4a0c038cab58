"""How a run ends: its outcome (RunOutcome), or the errors it raises (RunFailed, Interrupted) and the
sentence that says why it failed (failure_message)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import root_message
from orchestrator.config import JobConfig


class RunFailed(RuntimeError):
    """Training or export failed; the message says why and where the run directory is."""


class Interrupted(RuntimeError):
    """Stopped by a signal (Ctrl-C, SIGTERM); exit_code is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int = 130, directory: Path | None = None):
        super().__init__(message)
        self.exit_code, self.directory = exit_code, directory


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    model_dir: Path
    manifest: dict[str, Any]
    report: tuple[Path, Path] | None = None  # RUN_DIR/report.png, report.md (orchestrator/run_report.py); None if not drawn


def chain_text(error: BaseException) -> str:
    """The text of `error` and of every error under it (causes, each worker's failure): Ray wraps the one
    that says what happened several layers down."""
    seen: list[BaseException] = []
    todo = [error]
    while todo:
        cur = todo.pop()
        if cur is None or any(cur is s for s in seen):
            continue
        seen.append(cur)
        todo += [cur.__cause__, cur.__context__, getattr(cur, "cause", None), *(getattr(cur, "worker_failures", None) or {}).values()]
        todo += [getattr(cur, "controller_failure", None)]
    return "\n".join(str(e) for e in seen)


def memory_killed(error: BaseException) -> str | None:
    """The sentence for a run ended by Ray's memory monitor (jobs.attempts.memory_kill), or None."""
    from jobs import attempts

    return attempts.memory_kill(chain_text(error))


def failure_message(job: JobConfig, run_dir: Path, error: BaseException, resume_command: str) -> str:
    """Why the run failed in a sentence (a lost worker: which and why, from jobs/attempts' record; an
    error: the worker's own message), how many attempts it made, and how to continue it. Ray's raw
    text stays in ray.log."""
    from jobs import attempts
    from jobs.checkpoint import resume_step

    failures = attempts.failures(run_dir)
    lost = failures[-1]["reason"] if failures and ("was lost" in failures[-1]["reason"] or "memory monitor" in failures[-1]["reason"]) else None
    why = lost or memory_killed(error) or root_message(error)
    tries = len(failures)
    limit = job.scaling.max_failures
    tried = f"\n{tries} attempt(s) failed (scaling.max_failures: {limit})" if tries > 1 or lost else ""
    step = resume_step(run_dir)
    again = f"\nthe newest checkpoint is of step {step}; continue with: {resume_command}" if step else ""
    return f"training failed: {why}{tried}{again}\n(logs: {run_dir / 'ray.log'})"
