"""The one module that builds Ray Train objects (ScalingConfig, RunConfig, CheckpointConfig, TorchTrainer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Resources:
    use_gpu: bool
    cpus_per_worker: int


def build_trainer(job: JobConfig, run_dir: Path, resources: Resources) -> Any:
    """A TorchTrainer whose storage is <run_dir>/checkpoints. Building it again with the same run_dir
    resumes from the newest checkpoint there (Ray reuses the run name)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_loop import train_fn_per_worker

    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "cpus_per_worker": resources.cpus_per_worker,
        },
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
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0),
        ),
    )


def fit(job: JobConfig, run_dir: Path, resources: Resources) -> Any:
    return build_trainer(job, run_dir, resources).fit()
