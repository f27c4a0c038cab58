"""One run, start to end (train): the run directory, the data checks, the embedded local Ray (or the job's
cluster), Ray Train's fit, the export and the manifest's timings. Heavy imports stay inside functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from jobs.metrics_log import metrics_path, read_metrics
from orchestrator import rundir
from orchestrator.config import JobConfig, load_raw, to_yaml
from orchestrator.launch.capacity import Capacity, resources_for, training_cpus
from orchestrator.launch.data_checks import DataPass, checked, data_cache
from orchestrator.launch.export import export_run, finished, latest_checkpoint
from orchestrator.launch.localray import ensure_local_ray, output_to, shutdown_ray
from orchestrator.launch.outcome import Interrupted, RunFailed, RunOutcome, failure_message, memory_killed
from orchestrator.launch.progress import ProgressView
from orchestrator.launch.record import MANIFEST, finish_tracking, timeline, write_manifest


def worker_resources(job: JobConfig, capacity: Capacity) -> Any:
    """resources_for, refusing scaling.gpu: on where this machine's Ray has no GPU. On a cluster the
    workers wait for GPU nodes instead (an autoscaler adds them; Ray Train says it is waiting)."""
    if job.scaling.gpu == "on" and capacity.gpus == 0 and capacity.where == "this machine":
        raise RunFailed("scaling.gpu: on, but Ray found no GPU on this machine (fix: use scaling.gpu: auto or off)")
    return resources_for(job, capacity)


def fit(
    job: JobConfig, run_dir: Path, resources: Any, indexes: Any, stopper: Any, stamps: dict[str, float], user_stream: IO[str], resume_command: str, embedded: bool,
    local: bool,
) -> Any:
    """Ray Train's fit, and a fresh one from the newest checkpoint when Ray's memory monitor ended it: its kill
    takes Ray Train's own actors with the worker (Ray 2.60: "7 worker(s) were killed"), and Ray Train then
    fails for good instead of restarting. Such a restart counts against scaling.max_failures like any lost
    worker; the sentence saying which worker and how much memory is printed, Ray's text stays in ray.log.
    local: every worker runs on this machine (jobs/driver.py: build_trainer)."""
    from jobs import attempts
    from jobs.checkpoint import resume_step
    from jobs.driver import build_trainer

    while True:
        failed_before = len(attempts.failures(run_dir))
        groups_before = placement_groups()
        try:
            trainer = build_trainer(job, run_dir, resources, indexes, max_failures=job.scaling.max_failures - restarts_used(run_dir, stamps), local=local)
            stopper.hook(trainer)
            stamps.setdefault("trainer_built", time.time())
            try:
                return trainer.fit()
            finally:
                stopper.after_fit()
        except SystemExit:  # Ray Train's own SIGINT handler aborts the run and exits
            raise KeyboardInterrupt from None
        except Exception as e:  # Ray Train V2 raises the workers' error from fit()
            if stopper.received:
                raise KeyboardInterrupt from None
            killed = memory_killed(e)
            if killed and len(attempts.failures(run_dir)) == failed_before:  # Ray's callback saw no worker fail
                attempts.record_lost(run_dir, killed)
            if not killed or restarts_used(run_dir, stamps) > job.scaling.max_failures:
                raise RunFailed(failure_message(job, run_dir, e, resume_command)) from e
            if embedded:  # the killed controller never released its workers' CPUs: the next attempt's data tasks would wait for them forever
                release_placement_groups(placement_groups() - groups_before)
            step = resume_step(run_dir)
            said = attempts.failures(run_dir)[-1]["reason"]
            print(f"{said}\nrestarting from {f'the checkpoint of step {step}' if step else 'the start'} "
                  f"({restarts_used(run_dir, stamps)} of scaling.max_failures: {job.scaling.max_failures})", file=user_stream, flush=True)


def placement_groups() -> set[str]:
    """The ids of the placement groups Ray holds (created or waiting)."""
    from ray.util import placement_group_table

    return {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def release_placement_groups(ids: set[str]) -> None:
    """Remove the placement groups of an attempt whose Ray Train controller was killed with its workers."""
    from ray._raylet import PlacementGroupID
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id in ids:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    print(f"rayft: removed {len(ids)} placement group(s) of the killed attempt; {len(placement_groups())} left", flush=True)


def restarts_used(run_dir: Path, stamps: dict[str, float]) -> int:
    """The failed attempts of this invocation (each one a restart, or the end when none are left)."""
    from jobs import attempts

    return sum(1 for f in attempts.failures(run_dir) if f.get("time", 0) >= stamps["train_called"])


def new_run_dir(job: JobConfig) -> Path:
    return rundir.new_dir(Path(job.output), job.name)


def train(
    job: JobConfig,
    *,
    resume: Path | None = None,
    stream: IO[str] | None = None,
    progress: bool = True,
    run_dir: Path | None = None,
    connect: bool = False,
    started: float | None = None,
    job_file: str | None = None,
) -> RunOutcome:
    """Run one job on an embedded local Ray, or (connect) on the cluster this process was submitted to.
    run_dir: where the run directory goes (default <output>/<name>-<timestamp>).
    started: when the user's command started (time.time()); the manifest's timings count from it.
    job_file: named in the resume command that a stop or a failure prints.
    SIGTERM and Ctrl-C stop the run gracefully (orchestrator/signals.py) and raise Interrupted."""
    from orchestrator.signals import GracefulStop

    stopper = GracefulStop(Path(job.output), job.scaling.stop_grace_s)
    with stopper.installed():
        return _train(job, stopper, resume, stream, progress, run_dir, connect, started, job_file)


def _train(
    job: JobConfig,
    stopper: Any,
    resume: Path | None,
    stream: IO[str] | None,
    progress: bool,
    run_dir: Path | None,
    connect: bool,
    started: float | None,
    job_file: str | None,
) -> RunOutcome:
    from jobs import attempts
    from jobs.checkpoint import resume_step
    from jobs.data import DataError
    from jobs.encoded import encode_once
    from orchestrator.signals import stopped_by

    stream = stream or sys.stdout
    t0 = time.time()
    stamps = {"started": started or t0, "train_called": t0}  # wall-clock moments for the manifest's timings
    created = not resume and (run_dir is None or not run_dir.exists())
    # The preflight (and for small data every row's checks) on a thread from here, while Ray starts
    data_pass = DataPass(job, data_cache(job, resume.resolve() if resume else run_dir))
    if resume:
        run_dir = resume.resolve()
        if not (run_dir / "job.yaml").is_file():
            raise RunFailed(f"--resume {resume}: not a run directory (no job.yaml)")
        previous = load_raw(run_dir / "job.yaml")
        if previous.get("method") != job.method or previous.get("model") != job.model:
            raise RunFailed(f"--resume {resume}: that run trained {previous.get('method')} on {previous.get('model')}; the job says {job.method} on {job.model}")
    elif run_dir is not None:
        if (run_dir / "job.yaml").exists():
            raise RunFailed(f"{run_dir} already holds a run; continue it with --resume, or choose another directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        run_dir = run_dir.resolve()
    else:
        run_dir = new_run_dir(job)
    (run_dir / "job.yaml").write_text(to_yaml(job))
    print(f"run directory: {run_dir}", file=stream, flush=True)
    resume_command = f"rayft train {job_file or 'JOB'} --resume {run_dir}"
    stopper.run_dir = run_dir
    attempts.clear(run_dir)  # no stop request or recorded fatal error of an earlier invocation
    attempts.record_invocation(run_dir, stamps["started"])
    outcome_said = "failed"

    started_ray = False
    with output_to(run_dir / "ray.log", stream) as user_stream:
        from jobs.tracking import Tracker

        tracker = Tracker(job, run_dir, user_stream).start()  # opens while Ray starts
        stamps["ray_starting"] = time.time()
        # The driver needs torch next (Ray Train's TorchTrainer imports it): importing it while ray.init waits
        # for Ray's processes to come up hides most of that import. torch never imports ray, so the two
        # threads do not contend for the same modules.
        torch_import = threading.Thread(target=importlib.import_module, args=("torch",), daemon=True)
        torch_import.start()
        try:
            started_ray = ensure_local_ray(training_cpus(job), connect=connect)
            stamps["ray_ready"] = time.time()
            # GPU or not, and each worker's CPUs, from the nodes Ray has (a cluster's driver runs on its head)
            capacity = Capacity.from_ray(embedded=not connect)
            resources = worker_resources(job, capacity)
            try:
                # small data files were checked (and encoded once) on the thread; larger ones are Ray Data's
                # to check now that it is up (jobs/stream.py: in_process)
                stores, problems, done = data_pass.result()
                if done:
                    indexes, said, checked_at = done
                    stamps["data_checked"] = max(checked_at, stamps["ray_ready"])
                else:
                    indexes = checked(job, stores, problems)  # every row checked and measured, in parallel, before any worker starts
                    stamps["data_checked"] = time.time()
                    indexes, said = encode_once(job, indexes)
            except DataError:
                if created:  # nothing trained: leave nothing behind
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            from jobs.stream import image_token_summary

            for which, text in said.items():
                print(f"data.{which}: {text}", file=user_stream, flush=True)
            for which, ix in indexes.items():
                if summary := image_token_summary(ix):
                    print(f"data.{which}: {summary}", file=user_stream, flush=True)
            stamps["encoded_once"] = time.time()
            torch_import.join()
            with ProgressView(run_dir, user_stream, enabled=progress):
                result = fit(job, run_dir, resources, indexes, stopper, stamps, user_stream, resume_command, embedded=not connect, local=capacity.one_machine)
            stamps["fit_returned"] = time.time()
            if result.error is not None:
                raise RunFailed(failure_message(job, run_dir, result.error, resume_command))
            if not finished(run_dir):  # aborted (Ctrl-C) without an error: never export a partial run
                raise KeyboardInterrupt
            checkpoint = Path(result.checkpoint.path) if result.checkpoint else latest_checkpoint(run_dir)
            if checkpoint is None:
                raise RunFailed(f"training produced no checkpoint (run directory: {run_dir})")
            try:
                outcome = export_run(job, run_dir, checkpoint, write=False)  # the manifest is written once, below
            except Exception as e:
                traceback.print_exc()  # into ray.log
                why = str(e) if isinstance(e, RunFailed) else f"export failed: {e}"
                raise RunFailed(f"{why}\n(checkpoint kept: {checkpoint}; retry with: rayft merge {run_dir})") from e
            stamps["exported"] = time.time()
        except KeyboardInterrupt:
            started_ray = True
            name = stopped_by(stopper.received)
            outcome_said = f"stopped by {name}"
            step = resume_step(run_dir)
            saved = f"the newest checkpoint is of step {step}" if step else "no checkpoint was written yet"
            raise Interrupted(f"stopped by {name}; {saved}; continue with: {resume_command}", stopper.exit_code) from None
        finally:
            if started_ray:
                shutdown_ray()
            if run_dir.exists():  # (a run that found bad data before training is removed)
                attempts.record_invocation(run_dir, stamps["started"], "exported" if "exported" in stamps else outcome_said)
            if "exported" not in stamps:  # failed or stopped: the trackers' runs say so (a --resume continues them)
                tracker.finish("killed" if outcome_said.startswith("stopped") else "failed", [run_dir / "job.yaml", metrics_path(run_dir)])
            else:
                tracker.stop()
    stamps["finished"] = time.time()
    records = read_metrics(run_dir)
    outcome.manifest["timings"] = timeline(stamps, records)
    ran = attempts.invocations(run_dir, records)
    outcome.manifest["attempts"] = attempts.summary(records, attempts.failures(run_dir))
    outcome.manifest["invocations"] = ran
    outcome.manifest["timings"]["all_attempts_wall_s"] = round(sum(r["wall_s"] for r in ran), 1)  # every invocation, this one included
    write_manifest(run_dir / MANIFEST, outcome.manifest)
    try:
        from orchestrator.run_report import write_run_report

        report = write_run_report(run_dir)
    except Exception as e:  # the model is exported and the manifest written: a report that fails to draw must not fail the run
        print(f"warning: the run report was not written: {type(e).__name__}: {e} (try again with: rayft report {run_dir})", file=stream, flush=True)
        report = None
    tracker.stream = stream
    finish_tracking(tracker, run_dir, outcome, records)  # after the report: its files are artifacts
    return dataclasses.replace(outcome, report=report)
