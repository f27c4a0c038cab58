"""Where a job runs: an embedded local Ray (the default). Owns the run directory, Ray's log file, the
progress display, the export and the manifest. Heavy imports stay inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from jobs.errors import root_message
from jobs.metrics_log import METRICS_FILE, metrics_path, read_metrics
from orchestrator import rundir
from orchestrator.config import JobConfig, load_raw, to_yaml, uses_gpu

MODEL_DIR = "model"
MANIFEST = "manifest.json"
LIBRARIES = ("rayft", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "ray", "pyarrow", "accelerate")


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


def new_run_dir(job: JobConfig) -> Path:
    return rundir.new_dir(Path(job.output), job.name)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def resources_for(job: JobConfig):
    from jobs.driver import Resources

    use_gpu = uses_gpu(job)
    cores = os.cpu_count() or 1
    return Resources(use_gpu=use_gpu, cpus_per_worker=job.scaling.cpus_per_worker or max(1, cores // job.scaling.workers))


def ensure_local_ray(num_cpus: int, dashboard: bool = False, connect: bool = False) -> bool:
    """Start an embedded single-machine Ray unless one is already up in this process; True if started here.
    num_cpus: what the training workers reserve; Ray gets as many logical CPUs again as the machine has
    cores for the Ray Data tasks that decode and encode rows beside them (with none left, Ray Data waits
    for CPUs forever).
    connect: join the cluster this process runs on instead (a job submitted with `rayft submit`).

    dashboard: also start the dashboard (on 127.0.0.1). Ray Train's PlacementGroupCleaner asks the State API,
    which the dashboard serves, whether a controller has died; without it, the workers of a Tune trial that
    ASHA stopped are never released."""
    import ray

    from orchestrator import processes

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    # ray.init replaces the SIGTERM handler with sys.exit; a handler rayft installed (orchestrator/signals.py) comes back after it
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # workers inherit this: no bars in ray.log
    if connect:
        ray.init(address="auto", log_to_driver=True, logging_level="WARNING")
        _restore_sigterm(sigterm)
        return True
    processes.sweep()  # the Ray processes of an earlier rayft command that was killed
    # Ray Train's controller polls its workers every 2 s by default: fit() returns only after the poll that
    # sees the workers done (4-5 s after the last step here), and a report waits while the previous one is
    # still queued. On one machine a poll is cheap; 0.5 s cut that tail to ~1.6 s (bench/overhead.py).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray processes that look the cluster up by themselves (Ray Train's PlacementGroupCleaner asks the State
    # API) fail with "Found multiple active Ray instances" when another Ray runs on the machine, and then
    # never release a stopped trial's placement group. So the GCS port is chosen here and every worker of
    # this job is told it (RAY_ADDRESS in the job's runtime_env).
    port = processes.free_port()
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus + data_cpus(),
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            logging_level="WARNING",
            runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}},
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    processes.record_local_ray()
    _restore_sigterm(sigterm)
    return True


def _restore_sigterm(handler: Any) -> None:
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


def shutdown_ray() -> None:
    """Stop the embedded Ray, and then whatever of its processes is still running (its agents can linger)."""
    import ray

    from orchestrator import processes

    processes.record_local_ray(update_only=True)  # the workers started since Ray came up
    ray.shutdown()
    processes.release_local_ray()


def data_cpus() -> int:
    """Logical CPUs an embedded Ray adds for Ray Data beside the training reservation: the machine's cores."""
    return os.cpu_count() or 1


@contextlib.contextmanager
def output_to(log_path: Path, user_stream: IO[str] | None = None) -> Iterator[IO[str]]:
    """Send this process's stdout/stderr (Ray's own output, worker logs) to log_path; yield a stream that
    still reaches where user_stream (default stdout; stderr under --json) went, for rayft's own progress."""
    user_stream = user_stream or sys.stdout
    try:
        fd_out, fd_err = sys.stdout.fileno(), sys.stderr.fileno()
        user_fd = user_stream.fileno()
    except (AttributeError, OSError, ValueError):  # already captured (CliRunner, notebooks): nothing to move
        with log_path.open("a"):
            yield user_stream
        return
    sys.stdout.flush()
    sys.stderr.flush()
    user_stream.flush()
    saved_out, saved_err = os.dup(fd_out), os.dup(fd_err)
    user = os.fdopen(os.dup({fd_out: saved_out, fd_err: saved_err}.get(user_fd, user_fd)), "w", buffering=1)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), fd_out)
        os.dup2(log.fileno(), fd_err)
        try:
            yield user
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, fd_out)
            os.dup2(saved_err, fd_err)
            os.close(saved_out)
            os.close(saved_err)
            user.close()


class ProgressView:
    """Tails metrics.jsonl in a thread: a live bar on a terminal, a line per eval otherwise."""

    def __init__(self, run_dir: Path, stream: IO[str], enabled: bool = True):
        self.run_dir, self.stream, self.enabled = run_dir, stream, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressView:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=self.stream)
        seen = len(read_metrics(self.run_dir))
        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False, disable=not console.is_terminal,
            # rich would otherwise swap sys.stdout/stderr for proxies that print above the bar: Ray's worker
            # lines (which the driver prints to sys.stdout) would cover the bar and miss ray.log
            redirect_stdout=False, redirect_stderr=False,
        )
        task = None
        with progress:
            while not self._stop.is_set():
                records = read_metrics(self.run_dir)
                for rec in records[seen:]:
                    if rec.get("event") == "start":
                        task = task if task is not None else progress.add_task("train", total=rec["total_steps"], info="")
                        progress.update(task, completed=rec["step"])
                        if not console.is_terminal:
                            console.print(f"training: {rec['total_steps']} steps, {rec['trainable_params']:,} trainable parameters")
                    elif task is not None and "train_loss" in rec:
                        info = f"loss {rec['train_loss']:.4f}"
                        if "eval_accuracy" in rec:
                            info += f"  eval loss {rec['eval_loss']:.4f}  acc {rec['eval_accuracy']:.1%}"
                        progress.update(task, completed=rec["step"], info=info)
                    if rec.get("event") == "eval" and not console.is_terminal:
                        generated = f", generated {rec['eval_generated_accuracy']:.1%}" if "eval_generated_accuracy" in rec else ""
                        console.print(f"step {rec['step']}: eval loss {rec['eval_loss']:.4f}, accuracy {rec['eval_accuracy']:.1%}{generated}")
                seen = len(records)
                self._stop.wait(0.5)


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def finished(run_dir: Path) -> bool:
    """Did the latest attempt in run_dir reach its last step? (metrics.jsonl ends with an `end` event)"""
    records = read_metrics(run_dir)
    return bool(records) and records[-1].get("event") == "end"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The registered checkpoint of the highest step (jobs/checkpoint.py), or None."""
    from jobs.checkpoint import latest_checkpoint as newest

    return newest(run_dir)


def _export_on_worker(job: JobConfig, run_dir: Path, checkpoint: Path, model_dir: Path) -> dict[str, Any]:
    """export.on: worker: the export as a Ray task on a node with the memory it needs (jobs/export_task.py), on
    the Ray this process already runs (rayft train, a submitted job's driver), else on the cluster at RAY_ADDRESS
    (a GCS address, HOST:PORT), else on an embedded local Ray started for it (its output goes to run_dir/ray.log)."""
    import ray

    from jobs.export_task import export_on_worker as on_worker

    if ray.is_initialized():
        return on_worker(job, checkpoint, model_dir)
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        raise RunFailed(f"export.on: worker joins the cluster's GCS (RAY_ADDRESS=HOST:6379), not its Jobs API ({address}); "
                        "set RAY_ADDRESS to the GCS address, unset it to export on a local Ray, or set export.on: driver")
    with output_to(run_dir / "ray.log"):
        ensure_local_ray(1, connect=bool(address))
        try:
            return on_worker(job, checkpoint, model_dir)
        finally:
            shutdown_ray()


def export_run(
    job: JobConfig, run_dir: Path, checkpoint: Path, extra: dict[str, Any] | None = None, parent: Path | None = None, write: bool = True
) -> RunOutcome:
    """Merge/export a checkpoint into <parent or run_dir>/model and write manifest.json beside it (write=False:
    the caller adds to the manifest and writes it once, at its end, with write_manifest)."""
    from jobs.generate import manifest_section
    from jobs.merge import export

    parent = parent or run_dir
    model_dir = parent / MODEL_DIR
    # export writes model.partial and renames it to model/ once checked (it alone owns that step): a failed or
    # killed export leaves the previous model/ untouched and at most model.partial, which the next export removes.
    try:
        parity = export(job, checkpoint, model_dir) if job.export.on == "driver" else _export_on_worker(job, run_dir, checkpoint, model_dir)
    except RunFailed:
        raise
    except Exception as e:  # a failed parity check, a full disk, an unreadable checkpoint: the export failed
        raise RunFailed(f"export failed: {e}") from e
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("event") == "eval"]
    start = next((r for r in records if r.get("event") == "start"), {})
    meta = checkpoint / "metrics.json"
    at_checkpoint = json.loads(meta.read_text()) if meta.is_file() else {"step": None}
    manifest = {
        "name": job.name,
        "method": job.method,
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "checkpoint": str(checkpoint),
        "metrics": {  # at the exported checkpoint
            "step": at_checkpoint["step"],
            "eval_accuracy": at_checkpoint.get("eval_accuracy"),
            "eval_loss": at_checkpoint.get("eval_loss"),
            "train_loss": at_checkpoint.get("train_loss"),
            "initial_eval_accuracy": evals[0].get("eval_accuracy") if evals and evals[0]["step"] == 0 else None,
            **({"eval_generated_accuracy": at_checkpoint.get("eval_generated_accuracy")} if job.eval.generate else {}),
            "tokens_per_s": _median([r["tokens_per_s"] for r in records if "tokens_per_s" in r]),
            "steps_per_s": _median([r["steps_per_s"] for r in records if "steps_per_s" in r]),
        },
        "trainable_params": start.get("trainable_params"),
        "total_params": start.get("total_params"),
        "dropped_rows": start.get("dropped_rows"),
        "parity": parity,
        **manifest_section(job, records, at_checkpoint, parity),  # eval.generate: the `generation` section
        "versions": versions(),
        "job": job.model_dump(mode="json"),
        **(extra or {}),
    }
    if write:
        manifest = write_manifest(parent / MANIFEST, manifest)
    return RunOutcome(run_dir, model_dir, manifest)


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest, keeping what an earlier one recorded that this one does not say (a re-export by
    `rayft merge` keeps the run's timings, attempts and search). Written through a temporary file and
    renamed, so a reader sees the old manifest or the new one, never half of one."""
    earlier: dict[str, Any] = {}
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            earlier = {}
    merged = {**earlier, **manifest}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.rename(path)
    return merged


def process_started() -> float:
    """When this process started, as a time.time() value (Linux: /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


# Contiguous spans from the command's start to its end: (name, from stamp, to stamp). Driver stamps come from
# train(); worker stamps from rank 0's records in metrics.jsonl (the same clock on one machine).
SPANS = (
    ("startup_s", "started", "train_called"),  # interpreter, imports, job file, fit check
    ("preflight_s", "train_called", "ray_starting"),  # row stores (schema, row counts), model + processor + chat template, run directory
    ("ray_init_s", "ray_starting", "ray_ready"),
    ("validation_s", "ray_ready", "data_checked"),  # the Ray Data pass over every row (cached for resumes and searches)
    ("encode_once_s", "data_checked", "encoded_once"),  # every row encoded once, where it fits the disk (jobs/encoded.py)
    ("trainer_build_s", "encoded_once", "trainer_built"),  # import ray.train + torch, batch schedule, datasets, TorchTrainer
    ("worker_start_s", "trainer_built", "worker_started"),  # Ray Train controller, placement group, worker process
    ("data_s", "worker_started", "data_encoded"),  # worker imports, its dataset shards
    ("model_s", "data_encoded", "model_loaded"),  # base (4-bit) + adapters + optimizer (+ checkpoint restored)
    ("initial_eval_s", "model_loaded", "first_step_started"),  # the step-0 eval ("before" accuracy), the first batches streamed
    ("first_step_s", "first_step_started", "first_step_done"),
    ("training_s", "first_step_done", "worker_done"),  # the other steps, evals, checkpoints
    ("fit_teardown_s", "worker_done", "fit_returned"),
    ("export_s", "fit_returned", "exported"),  # merge, save, reload, parity check
    ("ray_shutdown_s", "exported", "finished"),
)


def timeline(stamps: dict[str, float], records: list[dict[str, Any]]) -> dict[str, float]:
    """Where the wall time of one run went: the SPANS, start -> first optimizer step, total wall, summed
    optimizer-step time and the overhead (wall - step time) / wall. Uses the last attempt in the records."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    attempt = records[starts[-1] :] if starts else []
    stamps = dict(stamps)
    steps_s = None
    for r in attempt:
        if r.get("event") == "start" and "clock" in r:
            stamps.update(r["clock"])
        elif r.get("event") == "first_step":
            stamps.update(first_step_started=r["time"] - r["step_s"], first_step_done=r["time"])
        elif r.get("event") == "end" and "time" in r:
            stamps["worker_done"], steps_s = r["time"], r["steps_s"]
    out = {name: round(stamps[b] - stamps[a], 3) for name, a, b in SPANS if a in stamps and b in stamps}
    out["fit_s"] = round(stamps["fit_returned"] - stamps["ray_starting"], 3)  # Ray start + training
    out["total_s"] = round(stamps["finished"] - stamps["train_called"], 3)  # train() itself
    wall = stamps["finished"] - stamps["started"]
    out["wall_s"] = round(wall, 3)  # the whole command
    if "first_step_done" in stamps:
        out["start_to_first_step_s"] = round(stamps["first_step_done"] - stamps["started"], 3)
    if steps_s is not None:
        out["steps_s"] = round(steps_s, 3)
        out["overhead_pct"] = round(100 * (wall - steps_s) / wall, 2)
    return out


def data_cache(job: JobConfig, run_dir: Path | None = None) -> Path:
    """Where row stores and validation indexes live: beside the run directories, shared by runs and resumes."""
    from jobs.driver import DATA_CACHE

    return (run_dir.parent if run_dir is not None else Path(job.output)) / DATA_CACHE


def preflight(job: JobConfig, cache: Path, strict: bool = False) -> Any:
    """The controller's checks, before Ray starts (jobs/preflight.py): each data file parses, has the job's
    columns and rows; the model's config and processor load and its chat
    template encodes a row. Returns (row stores, problems of files that have none), or with strict the
    stores, raising DataError for any problem. Every row is then checked by a Ray Data pass
    (jobs/stream.py: index) before the first step; checked() reports its problems with these."""
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
    """checked() and encode_once() on a thread of this process, for data small enough to need no Ray
    (jobs/stream.py: in_process): started at once, joined by result()."""

    def __init__(self, job: JobConfig, stores: dict[str, Any], problems: list[str]):
        self._out: tuple[Any, ...] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(job, stores, problems), daemon=True)
        self._thread.start()

    def _run(self, job: JobConfig, stores: dict[str, Any], problems: list[str]) -> None:
        from jobs.encoded import encode_once

        try:
            indexes = checked(job, stores, problems)
            at = time.time()
            indexes, said = encode_once(job, indexes)
            self._out = (indexes, said, at)
        except BaseException as e:  # raised again in the caller's thread
            self._error = e

    def result(self) -> tuple[dict[str, Any], dict[str, str], float]:
        """(indexes with their encoded rows, what encode-once did per file, when the rows were checked)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out  # type: ignore[return-value]


def validate_data(job: JobConfig) -> dict[str, dict[str, int]]:
    """`rayft validate`'s data checks: the same preflight and validation pass as `rayft train` (whose index
    a later run reuses), on an embedded Ray whose output goes to <output>/.rayft-data/validate.log. Returns
    per file (train, eval): rows usable, rows dropped (data.too_long: drop) and the longest row in tokens;
    raises DataError naming every problem."""
    from jobs.stream import in_process

    cache = data_cache(job)
    stores, problems = preflight(job, cache)
    if all(in_process(store) for store in stores.values()):  # small files: checked here, no Ray started
        indexes = checked(job, stores, problems)
    else:
        resources = resources_for(job)
        cache.mkdir(parents=True, exist_ok=True)
        with output_to(cache / "validate.log"):
            started = ensure_local_ray(resources.cpus_per_worker * job.scaling.workers)
            try:
                indexes = checked(job, stores, problems)
            finally:
                if started:
                    shutdown_ray()
    return {which: {"rows": len(ix.rows), "dropped": ix.dropped, "longest": int(ix.lengths.max()) if len(ix.lengths) else 0} for which, ix in indexes.items()}


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
    from jobs.driver import build_trainer
    from jobs.encoded import encode_once
    from jobs.stream import in_process, warm_task_processes
    from orchestrator.signals import stopped_by

    stream = stream or sys.stdout
    t0 = time.time()
    stamps = {"started": started or t0, "train_called": t0}  # wall-clock moments for the manifest's timings
    created = not resume and (run_dir is None or not run_dir.exists())
    stores, problems = preflight(job, data_cache(job, resume.resolve() if resume else run_dir))
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
    resources = resources_for(job)
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
        # Small data files are checked (and encoded once) in this process, on a thread, while Ray starts;
        # larger ones by Ray Data tasks once it is up (jobs/stream.py: in_process).
        local_pass = DataPass(job, stores, problems) if all(in_process(store) for store in stores.values()) else None
        try:
            started_ray = ensure_local_ray(resources.cpus_per_worker * job.scaling.workers, connect=connect)
            stamps["ray_ready"] = time.time()
            try:
                if local_pass:
                    indexes, said, checked_at = local_pass.result()
                    stamps["data_checked"] = max(checked_at, stamps["ray_ready"])
                else:
                    indexes = checked(job, stores, problems)  # every row checked and measured, in parallel, before any worker starts
                    stamps["data_checked"] = time.time()
                    indexes, said = encode_once(job, indexes)
            except DataError:
                if created:  # nothing trained: leave nothing behind
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            for which, text in said.items():
                print(f"data.{which}: {text}", file=user_stream, flush=True)
            if started_ray:  # a fresh Ray: its task processes have imported nothing yet
                warm_task_processes(data_cpus())
            stamps["encoded_once"] = time.time()
            torch_import.join()
            with ProgressView(run_dir, user_stream, enabled=progress):
                try:
                    trainer = build_trainer(job, run_dir, resources, indexes)
                    stopper.hook(trainer)
                    stamps["trainer_built"] = time.time()
                    try:
                        result = trainer.fit()
                    finally:
                        stopper.after_fit()
                except SystemExit:  # Ray Train's own SIGINT handler aborts the run and exits
                    raise KeyboardInterrupt from None
                except Exception as e:  # Ray Train V2 raises the workers' error from fit()
                    if stopper.received:
                        raise KeyboardInterrupt from None
                    raise RunFailed(failure_message(job, run_dir, e, resume_command)) from e
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


def finish_tracking(tracker: Any, run_dir: Path, outcome: RunOutcome, records: list[dict[str, Any]]) -> None:
    """The trackers' runs end with the run's files as artifacts (the merged model too where log_model is
    on) and the export's numbers."""
    manifest = outcome.manifest
    parity = manifest.get("parity") or {}
    merged = ((manifest.get("generation") or {}).get("merged") or {}).get("accuracy")
    summary = {"merged_accuracy": parity.get("merged_accuracy"), "merged_generated_accuracy": merged}
    files = [run_dir / n for n in (MANIFEST, "job.yaml", METRICS_FILE, "report.md", "report.png")]
    tracker.finish("finished", files, outcome.model_dir, summary, tables=generations_table(records, manifest))


def generations_table(records: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """eval.generate's answers as one table (step, model, prompt, expected, generated, correct): the trained
    model's at every eval (its metrics.jsonl records), and the merged model's; empty without eval.generate."""
    rows = [(r["step"], "trained", s) for r in records if r.get("event") == "generations" for s in r.get("samples", [])]
    merged = (manifest.get("generation") or {}).get("merged") or {}
    rows += [(manifest["metrics"].get("step"), "merged", s) for s in merged.get("samples", [])]
    if not rows:
        return {}
    columns = ("prompt", "expected", "generated", "correct")
    table = {"step": [step for step, _, _ in rows], "model": [model for _, model, _ in rows]}
    table |= {c: [s.get(c) for _, _, s in rows] for c in columns}
    return {"generations": table}


def accuracy_line(metrics: dict[str, Any]) -> str:
    """The eval accuracy at the exported checkpoint, from the step-0 number where eval.at_start took one."""
    before = metrics.get("initial_eval_accuracy")
    now = f"{metrics['eval_accuracy']:.1%} (eval loss {metrics['eval_loss']:.4f})"
    return f"eval accuracy: {before:.1%} -> {now}" if before is not None else f"eval accuracy: {now}"


def failure_message(job: JobConfig, run_dir: Path, error: BaseException, resume_command: str) -> str:
    """Why the run failed in a sentence (a lost worker: which and why, from jobs/attempts' record; an
    error: the worker's own message), how many attempts it made, and how to continue it. Ray's raw
    text stays in ray.log."""
    from jobs import attempts
    from jobs.checkpoint import resume_step

    failures = attempts.failures(run_dir)
    lost = failures[-1]["reason"] if failures and "was lost" in failures[-1]["reason"] else None
    why = lost or root_message(error)
    tries = len(failures)
    limit = job.scaling.max_failures
    tried = f"\n{tries} attempt(s) failed (scaling.max_failures: {limit})" if tries > 1 or lost else ""
    step = resume_step(run_dir)
    again = f"\nthe newest checkpoint is of step {step}; continue with: {resume_command}" if step else ""
    return f"training failed: {why}{tried}{again}\n(logs: {run_dir / 'ray.log'})"
