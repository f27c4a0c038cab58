"""A Ray Train callback, run on its controller: why each attempt of a run ended (a worker lost, an error),
appended to <run_dir>/failures.jsonl for the manifest's attempts and the message when restarts run out; and
its Ray Tune counterpart for a search's trials run in their own actors (jobs/tune_worker.py), run on the driver.
Its own module: importing it imports ray.train and ray.tune, which the controller's other commands never need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback
from ray.tune import Callback

from jobs import attempts


class FailureRecorder(UserCallback):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        attempts.record_failure(Path(self.run_dir), worker_exceptions)


class TrialFailures(Callback):
    """Why each attempt of a trial run in its own actor ended (an error it raised, or its process lost), appended
    to TRIAL_DIR/failures.jsonl on the driver, as FailureRecorder does for a TorchTrainer's workers."""

    def __init__(self, search_dir: str):
        self.search_dir = search_dir

    def _record(self, trial: Any) -> None:
        trial_dir = Path(self.search_dir) / "trials" / str(trial)
        if trial_dir.is_dir():
            attempts.record_failure(trial_dir, {0: _latest_error(trial)})

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._record(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._record(trial)


def _latest_error(trial: Any) -> BaseException:
    """The error that just ended the trial's attempt, from the files Tune has written on the driver (its copies in
    the experiment's storage come later): the pickled exception, else the last failure in the text trace."""
    from ray import cloudpickle

    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and Path(pickled).is_file():
        return cloudpickle.loads(Path(pickled).read_bytes())
    if text and Path(text).is_file():
        return RuntimeError(Path(text).read_text().rsplit("Failure #", 1)[-1].strip())
    return RuntimeError("no error was recorded by Ray Tune")
