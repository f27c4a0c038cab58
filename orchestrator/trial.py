"""One Ray Tune trial, run in the trial's actor: the job with the trial's overrides, checked against the
search's memory budget (orchestrator.planner), trained by the same loop as `rayft train`: in the trial's actor
itself when the trial is one worker on one machine (jobs/tune_worker.py), else by a TorchTrainer of its workers
(jobs.driver.build_trainer). orchestrator.search hands `tune_trial` to Ray Tune, with `trial_resources` (and
jobs.failure_recorder.TrialFailures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jobs.driver import DATA_CACHE, Resources, build_trainer
from jobs.errors import root_message
from jobs.metrics_log import metrics_path
from orchestrator import planner
from orchestrator.config import JobConfig
from orchestrator.search_report import write_trial_memory

SKIPPED = "skipped.txt"  # in a trial directory: the trial was predicted not to fit, and why


def in_trial_actor(job: JobConfig, one_machine: bool) -> bool:
    """Whether the search's trials run in Tune's trial actor (jobs/tune_worker.py) rather than a TorchTrainer: each
    is one worker (scaling.workers 1, not searched) on a Ray of one machine. Then the actor reserves the worker's
    CPUs and GPU itself, and Tune restarts a failed trial (tune.max_failures)."""
    assert job.tune is not None
    return one_machine and job.scaling.workers == 1 and "scaling.workers" not in job.tune.space


def trial_resources(resources: Resources, in_actor: bool) -> dict[str, float]:
    """What a trial's actor reserves: the worker's CPUs and GPU when it is the worker (in_trial_actor), else
    nothing (its TorchTrainer's workers reserve theirs; it only drives them)."""
    if in_actor:
        return {"cpu": resources.cpus_per_worker, "gpu": 1 if resources.use_gpu else 0}
    return {"cpu": 0, "memory": 1}


def trial_fits(job: JobConfig, trial_dir: Path, budget: planner.Budget | None) -> bool:
    """The seam between Tune and the planner: a trial predicted not to fit is recorded as skipped (why, in
    trial_dir/skipped.txt) instead of launching its workers."""
    (trial_dir / SKIPPED).unlink(missing_ok=True)
    if budget is None:
        return True
    verdict = planner.check(job, budget)
    if not verdict.fits:
        (trial_dir / SKIPPED).write_text(verdict.message)
    return verdict.fits


def tune_trial(
    overrides: dict[str, Any],
    base: dict[str, Any],
    search_dir: str,
    resources: Resources,
    keep_best: str,
    budget: planner.Budget | None = None,
    max_failures: int = 1,
    tracking_parent: str | None = None,
    local: bool = False,
    in_actor: bool = False,
) -> None:
    """One Ray Tune trial: the job with the trial's dotted overrides applied by the same function as --set,
    trained by the same loop as `rayft train` (in this actor, or by a TorchTrainer), its reports sent to Tune (ASHA
    decides on them).
    budget (planner.Budget): a trial predicted not to fit in it is recorded as skipped and never launched;
    every trial's predicted memory per worker (on the budget's device) goes to trial_dir/memory.json.
    max_failures (tune.max_failures): restarts of a TorchTrainer trial's workers after one is lost (a trial in
    this actor is restarted by Tune: the search's FailureConfig).
    tracking_parent: the search's MLflow run, under which the trial logs its child run.
    local: the search's Ray is one node, this machine: rows encoded once are read by the workers from its disk.
    in_actor (in_trial_actor): the trial is its one worker, trained in this actor; Tune makes its restarts."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs import stream
    from jobs.encoded import attach
    from jobs.tracking import Tracker
    from orchestrator.config import apply_overrides, build_job, to_yaml

    job, _ = build_job(apply_overrides(base, overrides))
    trial_dir = Path(search_dir) / "trials" / ray.tune.get_context().get_trial_name()
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "job.yaml").write_text(to_yaml(job))
    (trial_dir / "overrides.json").write_text(json.dumps(overrides))
    write_trial_memory(job, trial_dir, budget)  # the planner's prediction per worker, for the frontier report
    (trial_dir / "error.txt").unlink(missing_ok=True)  # a restored trial starts clean (an interrupt may have left one)
    tracker = Tracker(job, trial_dir, sys.stderr, parent=tracking_parent, group=Path(search_dir).name, run_name=trial_dir.name,
                      tags={"rayft.kind": "trial", "rayft.overrides": json.dumps(overrides)}).start()
    if not trial_fits(job, trial_dir, budget):
        tracker.finish("killed", tags={"rayft.status": "skipped"})
        return
    # The data is validated, and encoded where the disk allows, once per search (the driver's passes are
    # kept beside the row store); a trial whose model or columns differ gets its own validation here and
    # encodes as it streams.
    try:  # a trial's bad rows (its max_length, say) fail that trial alone
        indexes = attach(job, stream.index(job, stream.build_stores(job, Path(search_dir) / DATA_CACHE)))
        if in_actor:
            from jobs import tune_worker

            tune_worker.run(job, trial_dir, resources, indexes, keep_best)
        else:
            trainer = build_trainer(
                job, trial_dir, resources, indexes, callbacks=[TuneReportCallback()], keep_best=keep_best, max_failures=max_failures, local=local
            )
            trainer.fit()
    except Exception as e:  # recorded for the results table; Tune marks the trial errored and goes on
        (trial_dir / "error.txt").write_text(root_message(e))
        tracker.finish("failed", [trial_dir / "job.yaml"])
        raise
    except SystemExit:  # Tune stopped a trial run in this actor at a report (ASHA, the budget): the actor may take
        tracker.stop()  # the next trial, so its tailing ends here; the search ends its runs (tracking.finish_search)
        raise
    tracker.finish("finished", [trial_dir / "job.yaml", metrics_path(trial_dir)])
