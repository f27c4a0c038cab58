"""What a training worker takes from Ray Train, as one object (Worker): its rank and device, its data shards, the
checkpoint to continue from, where it reports (metrics and checkpoints), its node, and Ray's preemption notices.
jobs/train_loop.py's loop reads only this; `from_ray` builds it in a Ray Train worker (the one file of the
loop's that calls Ray Train), jobs/local_worker.py builds it without Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Report = Callable[[dict[str, Any], str | None, Callable[..., Any] | None], None]


@dataclass
class Worker:
    """What a worker takes from Ray Train (from_ray), or from jobs/local_worker.py without Ray."""

    rank: int
    world: int
    device: Any
    train_shard: Any
    """This worker's training micro batches: iter_batches(...) yields jobs/stream.py's encoded items."""
    eval_shard: Any
    """Its eval micro batches, alike; None when it has no eval rows."""
    checkpoint: Any
    """The checkpoint to continue from (as_directory() -> a local directory), or None."""
    report: Report
    """report(metrics, staged checkpoint directory or None, the fault drill's upload function or None): Ray
    Train's report, which copies the staged checkpoint into storage; the caller removes the staged copy after."""
    node_id: str
    preempted: Callable[[], list[str] | None]
    """The nodes being drained (a spot reclaim, a scale-down), or None."""
    force_parallel: bool = False
    """Run what only a run of several workers runs (DDP, rayft's collectives, the stop flag) with one worker
    too: jobs/local_worker.py's process group of one rank exercises them on a single GPU."""
    runner: str = "ray_train"
    """What runs the loop: "ray_train" (a TorchTrainer's worker), "tune_trial" (a search trial's own actor:
    jobs/tune_worker.py) or "local" (no Ray: jobs/local_worker.py); metrics.jsonl's start record says which."""


def from_ray(config: dict[str, Any]) -> Worker:
    """The Worker of a Ray Train worker: its rank, device, datasets, checkpoint and report from Ray."""
    import ray
    import ray.train
    import ray.train.torch

    from jobs import stream

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    node_id = ray.get_runtime_context().get_node_id()
    if config["data"].get("direct"):  # rows encoded once on this machine, read by the worker (jobs/stream.py: plan)
        train_shard, eval_shard = stream.direct_shards(config["data"]["direct"], rank, node_id)
    else:
        train_shard = ray.train.get_dataset_shard(f"train_{rank}")
        eval_shard = ray.train.get_dataset_shard(f"eval_{rank}") if f"eval_{rank}" in config["data"]["datasets"] else None
    return Worker(
        rank=rank,
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        train_shard=train_shard,
        eval_shard=eval_shard,
        checkpoint=ray.train.get_checkpoint(),
        report=_ray_report,
        node_id=node_id,
        preempted=_ray_preempted_nodes,
    )


def _ray_report(metrics: dict[str, Any], ckpt_dir: str | None, upload: Callable[..., Any] | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)


def _ray_preempted_nodes() -> list[str] | None:
    """The nodes Ray is draining (a spot reclaim, an autoscaler scale-down, KubeRay), agreed by every rank."""
    import ray.train

    info = ray.train.get_preemption_info()
    return info.preempted_node_ids if info is not None else None
