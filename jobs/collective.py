"""The collectives rayft's own code runs between training workers (DeepSpeed's and DDP's are theirs).

Two rules keep ranks in step on NCCL (docs/scaling.md, "Keeping ranks in step"):
- every collective's tensor is on the training device: NCCL reduces CUDA tensors only (gloo, on CPU, takes
  either, so a CPU test cannot see a slip; `reduce` makes the tensor itself, on the device it is given, and
  refuses a process group whose backend cannot take a tensor on that device);
- every rank calls the same collectives in the same order, whatever its data holds: callers reduce after
  the same step (or eval) on every rank, with a value even when a rank had no rows.

With one rank they return at once, unless forced (`force`): jobs/local_worker.py forces them so that a single
process with a process group of one rank (the GPU check's NCCL on one GPU) runs the calls a multi-worker run makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BACKEND_DEVICES = {"nccl": ("cuda",), "gloo": ("cpu", "cuda")}
"""Device types each torch.distributed backend reduces."""
_forced = False


def force(on: bool) -> None:
    """Run the collectives even in a process group of one rank (jobs/local_worker.py; off in Ray's workers)."""
    global _forced
    _forced = on


def active() -> bool:
    """Whether the collectives run: a process group of more than one rank, or of one when forced."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1 or _forced)


def reduce(values: Sequence[float], device: Any, op: str = "sum") -> list[float]:
    """`values` summed (op "sum") or maxed ("max") over every rank, elementwise; unchanged without a process
    group of more than one rank. The tensor is made here, on `device` (the worker's training device)."""
    import torch
    import torch.distributed as dist

    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    check_device(dist.get_backend(), tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def check_device(backend: str, tensor: Any) -> None:
    """Refuse a collective whose tensor the backend cannot reduce (a CPU tensor under NCCL hangs or fails
    with an opaque error on the first multi-GPU run)."""
    allowed = BACKEND_DEVICES.get(str(backend).lower())
    if allowed is not None and tensor.device.type not in allowed:
        raise RuntimeError(f"a {backend} collective was handed a {tensor.device.type} tensor; it reduces {' or '.join(allowed)} tensors only")


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (a picklable object), in rank order; [value] without a process group. Under NCCL
    torch moves the pickled bytes through the current CUDA device, which the worker set to its own."""
    import torch.distributed as dist

    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
