"""A training worker without Ray: the loop of jobs/train_loop.py (run_worker) in this process, for a machine that
has no Ray (the lent GPU machine: bench/gpu_check.py).

What Ray Train would give the worker is built here instead, from rayft's own pieces:
- a real torch.distributed process group of one rank (NCCL on CUDA, gloo on CPU; `process_group`), with the paths
  only several workers take forced on (Worker.force_parallel: the DDP wrap, rayft's collectives, the stop flag),
  so that a single GPU runs the calls a multi-GPU run makes;
- the data: the row stores and the validation pass (jobs/stream.py: build_stores, index; in this process for
  files of up to stream.LOCAL_ROWS rows), the schedule (stream.schedule_items) and each micro batch encoded
  by stream.encode_item as the loop reads it, where Ray Data's tasks would run the same function;
- checkpoints copied into RUN_DIR/checkpoints/checkpoint_<step> (Ray Train's storage would hold them), and a
  run continued from one (`run(..., resume=...)`), as a restart continues from Ray's latest.
The export of a run is jobs/merge.py's export, which needs no Ray either.

Nothing here imports ray (tests/test_gpu_check.py runs it where ray cannot be imported).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from jobs import checkpoint, stream
from jobs.checkpoint import META_FILE
from jobs.driver import DATA_CACHE
from jobs.train_loop import Training, run_worker
from jobs.worker import Worker
from orchestrator.config import JobConfig

NODE = "local"  # the "node" that encoded every micro batch


def process_group(device: Any) -> str:
    """A torch.distributed process group of one rank on `device` (NCCL for CUDA, gloo for CPU), as Ray Train
    sets one up for its workers; kept if one exists. Returns its backend. The environment Ray Train gives
    its workers (RANK, LOCAL_RANK, WORLD_SIZE...) is set too: DeepSpeed reads it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return str(dist.get_backend())
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    rendezvous = Path(tempfile.mkdtemp(prefix="rayft-pg-")) / "rendezvous"  # a file, not a port: nothing to collide with
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1, **kwargs)
    return backend


@dataclass
class LocalCheckpoint:
    """A checkpoint directory, as restore() reads Ray's Checkpoint (as_directory)."""

    path: Path

    def as_directory(self) -> Any:
        return nullcontext(str(self.path))


@dataclass
class LocalRun:
    """What a local run did: every report's metrics, each checkpoint's directory, the trained model."""

    run_dir: Path
    reports: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[int, Path] = field(default_factory=dict)
    training: Training | None = None

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None, upload: Callable[..., Any] | None) -> None:
        """Worker.report: the staged checkpoint is copied into RUN_DIR/checkpoints (upload, the fault drill's, is Ray's only)."""
        self.reports.append(metrics)
        if ckpt_dir is not None:
            self.checkpoints[int(metrics["step"])] = checkpoint.store(self.run_dir, ckpt_dir, int(metrics["step"]))


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was taken at (its META_FILE)."""
    return int(json.loads((path / META_FILE).read_text())["step"])


def shards(job: JobConfig, cache: Path, start_step: int = 0) -> tuple[stream.Items, stream.LocalShard, stream.LocalShard | None]:
    """(the schedule, rank 0's training micro batches from start_step, its eval micro batches or None), from the
    job's data files checked and encoded in this process."""
    stores = stream.build_stores(job, cache)
    indexes = stream.index(job, stores)
    items = stream.schedule_items(job, indexes, 1, start_step)

    def encoder(which: str) -> Callable[[Any], Any]:
        return partial(stream.encode_item, **stream.encode_kwargs(job, indexes[which], items.filler), node=NODE)

    train = stream.LocalShard(items.train[0], encoder("train"))
    evals = stream.LocalShard(items.eval[0], encoder("eval")) if 0 in items.eval else None
    return items, train, evals


def run(job: JobConfig, run_dir: Path, device: Any, resume: Path | None = None, threads: int | None = None) -> LocalRun:
    """Train `job` in this process as one Ray Train worker would, into run_dir (metrics.jsonl, rows/, checkpoints/);
    resume: a checkpoint directory to continue from (its step on). Needs `process_group(device)` first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start_step = checkpoint_step(resume) if resume is not None else 0
    items, train, evals = shards(job, run_dir.parent / DATA_CACHE, start_step)
    config = {
        "job": job.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "cpus_per_worker": threads or os.cpu_count() or 1,
        "fault_at_step": 0,
        "kill_in_checkpoint_at": 0,
        "data": {
            "total_steps": items.total_steps,
            "epoch_starts": items.epoch_starts,
            "rows": items.rows,
            "dropped_rows": items.dropped_rows,
            "eval_rows": items.eval_rows,
            "validation": {},
            "datasets": ["train_0", *(["eval_0"] if evals is not None else [])],
        },
    }
    local = LocalRun(run_dir)
    worker = one_rank(device, train, evals, resume, local.report, NODE, runner="local", force_parallel=True)
    local.training = run_worker(config, worker)
    return local


def one_rank(device: Any, train: Any, evals: Any, resume: Path | None, report: Any, node: str, runner: str, force_parallel: bool = False) -> Worker:
    """The Worker of a run of one rank that Ray Train does not run (this module's, jobs/tune_worker.py's): rank 0 of
    1, continuing from the checkpoint directory `resume` if given, on one machine (no node is drained under it)."""
    return Worker(
        rank=0,
        world=1,
        device=device,
        train_shard=train,
        eval_shard=evals,
        checkpoint=LocalCheckpoint(resume) if resume is not None else None,
        report=report,
        node_id=node,
        preempted=lambda: None,
        force_parallel=force_parallel,
        runner=runner,
    )
