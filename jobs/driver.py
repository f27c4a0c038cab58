"""The one module that builds Ray Train objects (ScalingConfig, RunConfig, CheckpointConfig, TorchTrainer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import JobConfig

if TYPE_CHECKING:
    from orchestrator.planner import Budget

CHECKPOINTS = "checkpoints"
SNAPSHOT = "checkpoint_manager_snapshot.json"
DATA_CACHE = ".rayft-data"  # row stores and validation indexes, beside the run directories (output/ or a search)


@dataclass(frozen=True)
class Resources:
    use_gpu: bool
    cpus_per_worker: int


def registered_checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> directory of every checkpoint Ray Train registered in run_dir (it registers one only after
    its copy into storage is complete; a directory left by a kill during the copy is not among them)."""
    snapshot = run_dir / CHECKPOINTS / SNAPSHOT
    if not snapshot.is_file():
        return {}
    results = json.loads(snapshot.read_text()).get("checkpoint_results") or []
    found = {int(r["metrics"]["step"]): run_dir / CHECKPOINTS / r["checkpoint_dir_name"] for r in results if "step" in (r.get("metrics") or {})}
    return {step: path for step, path in found.items() if path.is_dir()}


def resume_step(run_dir: Path) -> int:
    """The step of the checkpoint Ray Train restores in run_dir (its latest registered one), or 0."""
    snapshot = run_dir / CHECKPOINTS / SNAPSHOT
    if not snapshot.is_file():
        return 0
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    meta = run_dir / CHECKPOINTS / latest / "metrics.json" if latest else None
    return int(json.loads(meta.read_text())["step"]) if meta and meta.is_file() else 0


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The registered checkpoint of the highest step (full, LoRA and ZeRO alike), or None."""
    registered = registered_checkpoints(run_dir)
    return registered[max(registered)] if registered else None


def build_trainer(
    job: JobConfig,
    run_dir: Path,
    resources: Resources,
    indexes: dict[str, Any],
    callbacks: list[Any] | None = None,
    keep_best: str | None = None,
    max_failures: int | None = None,
) -> Any:
    """A TorchTrainer whose storage is <run_dir>/checkpoints, fed by one Ray Data stream per worker
    (jobs/stream.py) from the data's validated `indexes`. Building it again with the same run_dir resumes
    from the newest checkpoint there (Ray reuses the run name), and the streams start at that step.
    keep_best ("metric:max|min") keeps the best checkpoints rather than the newest (a Tune trial's best
    is what a search exports). max_failures: restarts after a lost worker (default scaling.max_failures)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs import stream
    from jobs.failure_recorder import FailureRecorder
    from jobs.train_loop import train_fn_per_worker

    plan = stream.plan(job, indexes, job.scaling.workers, resume_step(run_dir))
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "cpus_per_worker": resources.cpus_per_worker,
            # a fault drill: RAYFT_FAULT_AT_STEP=N makes the workers fail after step N (rehearse --resume)
            "fault_at_step": int(os.environ.get("RAYFT_FAULT_AT_STEP") or 0),
            # RAYFT_KILL_IN_CHECKPOINT=N: rank 0 dies (SIGKILL) halfway through copying step N's checkpoint into storage
            "kill_in_checkpoint_at": int(os.environ.get("RAYFT_KILL_IN_CHECKPOINT") or 0),
            "data": {
                "total_steps": plan.total_steps,
                "epoch_starts": plan.epoch_starts,
                "rows": plan.rows,
                "dropped_rows": plan.dropped_rows,
                "eval_rows": plan.eval_rows,
                "validation": {k: {"cached": v.cached, "nodes": v.nodes, "encoded_once": v.encoded is not None} for k, v in indexes.items()},
                "datasets": sorted(plan.datasets),
            },
        },
        datasets=plan.datasets,
        # every worker reads only the datasets named after its rank: nothing is split; each stream's output
        # keeps its input's order (the schedule's). How far a stream runs ahead is Ray Data's own object-store
        # budget: capping it (resource_limits.object_store_memory=512 MiB, or a 2 GiB object store) cut the
        # 1k-row run of bench/data_scale.py from 37 to 16 samples/s, so it is left at Ray Data's default.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.scaling.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
            placement_strategy=job.scaling.placement.upper(),
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=str(run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.train.keep_checkpoints,
                checkpoint_score_attribute=keep_best.split(":")[0] if keep_best else None,
                checkpoint_score_order=keep_best.split(":")[1] if keep_best else "max",
            ),
            failure_config=FailureConfig(max_failures=job.scaling.max_failures if max_failures is None else max_failures),
            callbacks=[FailureRecorder(str(run_dir)), *(callbacks or [])],
        ),
    )


def tune_trial(
    overrides: dict[str, Any],
    base: dict[str, Any],
    search_dir: str,
    resources: Resources,
    keep_best: str,
    budget: Budget | None = None,
    max_failures: int = 1,
    tracking_parent: str | None = None,
) -> None:
    """One Ray Tune trial: the job with the trial's dotted overrides applied by the same function as --set,
    trained by the same TorchTrainer as `rayft train`, its reports forwarded to Tune (ASHA decides on them).
    budget (planner.Budget): a trial predicted not to fit in it is recorded as skipped and never launched;
    every trial's predicted memory per worker (on the budget's device) goes to trial_dir/memory.json.
    max_failures (tune.max_failures): restarts of the trial's workers after one is lost.
    tracking_parent: the search's MLflow run, under which the trial logs its child run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs import stream
    from orchestrator.config import apply_overrides, build_job, to_yaml
    from orchestrator.search import trial_fits
    from orchestrator.search_report import write_trial_memory

    job, _ = build_job(apply_overrides(base, overrides))
    trial_dir = Path(search_dir) / "trials" / ray.tune.get_context().get_trial_name()
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "job.yaml").write_text(to_yaml(job))
    (trial_dir / "overrides.json").write_text(json.dumps(overrides))
    write_trial_memory(job, trial_dir, budget)  # the planner's prediction per worker, for the frontier report
    (trial_dir / "error.txt").unlink(missing_ok=True)  # a restored trial starts clean (an interrupt may have left one)
    import sys

    from jobs.tracking import Tracker

    tracker = Tracker(job, trial_dir, sys.stderr, parent=tracking_parent, group=Path(search_dir).name, run_name=trial_dir.name,
                      tags={"rayft.kind": "trial", "rayft.overrides": json.dumps(overrides)}).start()
    if not trial_fits(job, trial_dir, budget):
        tracker.finish("killed", tags={"rayft.status": "skipped"})
        return
    # The data is validated, and encoded where the disk allows, once per search (the driver's passes are
    # kept beside the row store); a trial whose model or columns differ gets its own validation here and
    # encodes as it streams.
    from jobs.encoded import attach

    try:  # a trial's bad rows (its max_length, say) fail that trial alone
        indexes = attach(job, stream.index(job, stream.build_stores(job, Path(search_dir) / DATA_CACHE)))
        trainer = build_trainer(
            job, trial_dir, resources, indexes, callbacks=[TuneReportCallback()], keep_best=keep_best, max_failures=max_failures
        )
        trainer.fit()
    except Exception as e:  # recorded for the results table; Tune marks the trial errored and goes on
        from orchestrator.launch import _root_message

        (trial_dir / "error.txt").write_text(_root_message(e))
        tracker.finish("failed", [trial_dir / "job.yaml"])
        raise
    tracker.finish("finished", [trial_dir / "job.yaml", trial_dir / "metrics.jsonl"])
