"""The one module that builds Ray Train objects (ScalingConfig, RunConfig, CheckpointConfig, TorchTrainer)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.checkpoint import CHECKPOINTS, resume_step
from orchestrator.config import JobConfig

DATA_CACHE = ".rayft-data"  # row stores and validation indexes, beside the run directories (output/ or a search)


@dataclass(frozen=True)
class Resources:
    use_gpu: bool
    cpus_per_worker: int


def worker_config(job: JobConfig, run_dir: Path, resources: Resources, indexes: dict[str, Any], plan: Any) -> dict[str, Any]:
    """What every worker's loop (jobs/train_loop.py: run_worker) is given: the job, the run directory, its CPUs,
    the fault drills asked for in the environment, and the data's plan (jobs/stream.py: plan)."""
    return {
        "job": job.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "cpus_per_worker": resources.cpus_per_worker,
        # a fault drill: RAYFT_FAULT_AT_STEP=N makes the workers fail after step N (rehearse --resume)
        "fault_at_step": int(os.environ.get("RAYFT_FAULT_AT_STEP") or 0),
        # RAYFT_OOM_AT_STEP=N: rank 0 takes host memory after step N until Ray's memory monitor kills it
        "oom_at_step": int(os.environ.get("RAYFT_OOM_AT_STEP") or 0),
        # RAYFT_KILL_IN_CHECKPOINT=N: rank 0 dies (SIGKILL) halfway through copying step N's checkpoint into storage
        "kill_in_checkpoint_at": int(os.environ.get("RAYFT_KILL_IN_CHECKPOINT") or 0),
        "data": {
            "total_steps": plan.total_steps,
            "epoch_starts": plan.epoch_starts,
            "rows": plan.rows,
            "dropped_rows": plan.dropped_rows,
            "eval_rows": plan.eval_rows,
            "validation": {k: {"cached": v.cached, "nodes": v.nodes, "encoded_once": v.encoded is not None} for k, v in indexes.items()},
            "datasets": plan.names,
            "direct": plan.direct,
        },
    }


def build_trainer(
    job: JobConfig,
    run_dir: Path,
    resources: Resources,
    indexes: dict[str, Any],
    callbacks: list[Any] | None = None,
    keep_best: str | None = None,
    max_failures: int | None = None,
    local: bool = False,
) -> Any:
    """A TorchTrainer whose storage is <run_dir>/checkpoints, fed by one Ray Data stream per worker
    (jobs/stream.py) from the data's validated `indexes`. Building it again with the same run_dir resumes
    from the newest checkpoint there (Ray reuses the run name), and the streams start at that step.
    keep_best ("metric:max|min") keeps the best checkpoints rather than the newest (a Tune trial's best
    is what a search exports). max_failures: restarts after a lost worker (default scaling.max_failures).
    local: every worker runs on this machine (an embedded Ray of one node): rows encoded once are read by the
    workers from this machine's disk instead of through Ray Data (jobs/stream.py: plan)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs import stream
    from jobs.failure_recorder import FailureRecorder
    from jobs.train_loop import train_fn_per_worker

    plan = stream.plan(job, indexes, job.scaling.workers, resume_step(run_dir), local=local)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=worker_config(job, run_dir, resources, indexes, plan),
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
