"""Budgets, fit checks and recommendations: what a job's workers may use on this machine (Budget,
budget_for), whether a predicted plan fits it (fits, check: the fit check `rayft train` and `rayft tune` run
before anything launches), and the cheapest change that would (recommend; compare: the job against the
alternatives `rayft plan` shows).

The bytes come from orchestrator/planner/memory.py; the table `rayft plan` prints is
orchestrator/planner/render.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig, apply_overrides, gpu_present, uses_gpu
from orchestrator.dotted import get as dotted_get
from orchestrator.planner.memory import Device, GiB, Plan, plan
from orchestrator.planner.shapes import ModelShape, PlanError, load_shape

# ----------------------------------------------------------------------------------------------------
# Budgets: the memory a job's workers may use


@dataclass(frozen=True)
class Budget:
    """Memory to plan against: per GPU, or host memory for the CPU workers on this node."""

    device: Device
    memory: int | None
    source: str
    per_worker: bool = False
    """memory is already per worker (an explicit limit); otherwise CPU host memory is split among workers."""
    host: int | None = None
    """GPU runs: host memory available on the node, for what CPU offload moves there (None: not checked)."""

    def for_workers(self, workers: int) -> int | None:
        if self.memory is None or self.device == "gpu" or self.per_worker:
            return self.memory
        return self.memory // workers


def fits(p: Plan, budget: Budget) -> bool:
    available = budget.for_workers(p.workers)
    if budget.device == "gpu" and budget.host is not None and p.offloaded * p.workers > budget.host:
        return False  # CPU offload needs the host memory too
    return available is None or p.total <= available


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_memory() -> tuple[int, int] | None:
    """(GPUs, smallest total memory in bytes) from nvidia-smi; never imports torch."""
    if not gpu_present():
        return None
    try:
        out = subprocess.run(
            [
                shutil.which("nvidia-smi") or "nvidia-smi",
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        sizes = [int(float(x)) * 2**20 for x in out.split() if x.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return (len(sizes), min(sizes)) if sizes else None


def budget_for(job: JobConfig, limit: int | None = None, concurrent: int = 1, source: str = "--memory-limit", capacity: Any = None) -> Budget:
    """What a job's workers may use: an explicit per-worker limit (named by `source` in messages), the GPU's
    memory, or host memory (MemAvailable) shared by the workers (of `concurrent` trials) on this node.
    capacity (launch.Capacity): the Ray cluster's nodes, whose GPUs (and GPU model) decide; None: this
    machine's (nvidia-smi)."""
    use_gpu = uses_gpu(job, None if capacity is None else capacity.gpus > 0)
    device: Device = "gpu" if use_gpu else "cpu"
    if limit is not None:
        return Budget(device, limit, source, per_worker=True)
    if use_gpu and capacity is not None and capacity.where != "this machine":
        known = capacity.gpu_memory()
        return Budget("gpu", known[1] if known else None, f"Ray accelerator_type {known[0]}" if known else "unknown (Ray names no known GPU model; pass --memory-limit)")
    if use_gpu:
        found = gpu_memory()
        return Budget(
            "gpu",
            found[1] if found else None,
            "nvidia-smi memory.total" if found else "unknown (nvidia-smi gave no memory)",
            host=host_available(),
        )
    host = host_available()
    if host is None:
        return Budget("cpu", None, "unknown (no /proc/meminfo)")
    source = f"host MemAvailable {host / GiB:.1f} GiB" + (
        f" / {concurrent} concurrent trials" if concurrent > 1 else ""
    )
    return Budget("cpu", host // concurrent, source)


def split_note(budget: Budget, workers: int) -> str:
    """` / N workers` where CPU host memory is shared among the job's workers (for messages)."""
    shared = budget.device == "cpu" and not budget.per_worker and budget.memory is not None and workers > 1
    return f" / {workers} workers" if shared else ""


# ----------------------------------------------------------------------------------------------------
# Alternatives and the recommendation


def describe(job: JobConfig) -> str:
    """A short name for a configuration: `qlora nf4+dq bf16`, `full bf16 ZeRO-3 x4 offload`, ..."""
    parts = [job.method]
    if job.quantized:
        parts.append(job.quantization.type + ("+dq" if job.quantization.double_quant else ""))
    parts.append(job.precision)
    if job.deepspeed:
        ds = job.deepspeed
        parts.append(f"ZeRO-{ds.stage} x{job.scaling.workers}")
        if ds.offload_optimizer == "cpu" or ds.offload_params == "cpu":
            parts.append(
                "offload "
                + "+".join(
                    k
                    for k, v in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params))
                    if v == "cpu"
                )
            )
    elif job.scaling.workers > 1:
        parts.append(f"DDP x{job.scaling.workers}")
    if job.train.gradient_checkpointing:
        parts.append("ckpt")
    parts.append(f"mb{job.train.micro_batch_size}")
    return " ".join(parts)


def _variant(job: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    return JobConfig.model_validate(apply_overrides(job.model_dump(mode="json"), overrides))


def _changes(job: JobConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change something in `job`."""
    current = job.model_dump(mode="json")
    out = {}
    for key, value in overrides.items():
        if dotted_get(current, key) != value:
            out[key] = value
    return out


_FULL = {"method": "full", "quantization.type": "none"}
_ADAPTERS = {"deepspeed": None, "freeze": []}


def alternatives(gpus: int) -> list[dict[str, Any]]:
    """What `rayft plan` compares the job with, as overrides of the job: full fine-tuning, full + ZeRO-3
    over `gpus` workers (also with CPU offload), LoRA, QLoRA NF4."""
    zero3 = {
        **_FULL,
        "deepspeed.stage": 3,
        "deepspeed.offload_optimizer": "none",
        "deepspeed.offload_params": "none",
        "scaling.workers": gpus,
    }
    return [
        {**_FULL, "deepspeed": None},
        zero3,
        {**zero3, "deepspeed.offload_optimizer": "cpu", "deepspeed.offload_params": "cpu"},
        {"method": "lora", "quantization.type": "none", **_ADAPTERS},
        {"method": "qlora", "quantization.type": "nf4", **_ADAPTERS},
    ]


def _ladder(job: JobConfig, gpus: int) -> Iterator[dict[str, Any]]:
    """Changes to try, cheapest first: keep the method and maths and trade memory for compute (gradient
    checkpointing, a smaller micro batch with more accumulation: the same global batch); then shard full
    fine-tuning with ZeRO (and offload to host memory); then adapters; then adapters over a 4-bit base."""
    structures: list[dict[str, Any]] = [{}]
    if job.method == "full":
        zero = {"scaling.workers": gpus} if gpus > 1 else {}
        if gpus > 1:
            structures += [{**zero, "deepspeed.stage": 2}, {**zero, "deepspeed.stage": 3}]
        structures.append(
            {
                **zero,
                "deepspeed.stage": 3,
                "deepspeed.offload_optimizer": "cpu",
                "deepspeed.offload_params": "cpu",
            }
        )
        structures.append({"method": "lora", "quantization.type": "none", **_ADAPTERS})
    if job.method != "qlora":
        structures.append({"method": "qlora", "quantization.type": "nf4", **_ADAPTERS})
    batch = job.train.micro_batch_size * job.train.grad_accum
    memory = [
        {},
        {"train.gradient_checkpointing": True},
        {"train.gradient_checkpointing": True, "train.micro_batch_size": 1, "train.grad_accum": batch},
    ]
    for structure in structures:
        for saving in memory:
            yield {**structure, **saving}


def recommend(job: JobConfig, shape: ModelShape, budget: Budget, gpus: int | None = None) -> Plan | None:
    """The cheapest configuration predicted to fit (the job itself when it fits), or None."""
    gpus = gpus or job.scaling.workers
    seen = set()
    for overrides in _ladder(job, gpus):
        changes = _changes(job, overrides)
        key = json.dumps(changes, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        candidate = _variant(job, changes)
        p = plan(candidate, shape, budget.device, describe(candidate), changes)
        if fits(p, budget):
            return p
    return None


def set_flags(overrides: dict[str, Any]) -> str:
    """`--set key=value ...` for a change, as a user would type it."""
    return " ".join(
        f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()
    )


def change_text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items())


# ----------------------------------------------------------------------------------------------------
# The fit check


@dataclass(frozen=True)
class Verdict:
    fits: bool
    message: str
    """Why it does not fit and the cheapest change that would, or a warning when no check was possible."""
    plan: Plan | None = None
    fix: Plan | None = None


class DoesNotFit(RuntimeError):
    """A search none of whose trials is predicted to fit (the message says why and what would)."""


def check(job: JobConfig, budget: Budget) -> Verdict:
    """The fit check `rayft train` and `rayft tune` run before anything launches."""
    try:
        shape = load_shape(job.model_dir)
    except PlanError as e:
        return Verdict(True, f"memory planner: {e}; fit check skipped")
    available = budget.for_workers(job.scaling.workers)
    if available is None:
        return Verdict(True, f"memory planner: memory available is {budget.source}; fit check skipped")
    p = plan(job, shape, budget.device)
    if fits(p, budget):
        return Verdict(True, "", p)
    where = "per GPU" if budget.device == "gpu" else "per CPU worker"
    message = (
        f"predicted {p.total / GiB:.2f} GiB {where} ({describe(job)}), {available / GiB:.2f} GiB available "
        f"({budget.source}{split_note(budget, job.scaling.workers)})"
    )
    if p.total <= available:  # the device fits; the host memory CPU offload needs does not
        message += f"; CPU offload needs {p.offloaded * p.workers / GiB:.2f} GiB of host memory, {(budget.host or 0) / GiB:.2f} GiB available"
    fix = recommend(job, shape, budget)
    if fix is None:
        message += "; no configuration rayft knows fits: use a larger device or more workers"
    else:
        message += (
            f"\ncheapest change that fits: set {change_text(fix.overrides)} "
            f"(predicted {fix.total / GiB:.2f} GiB)\n  e.g. {set_flags(fix.overrides)}"
        )
    return Verdict(False, message, p, fix)


# ----------------------------------------------------------------------------------------------------
# `rayft plan`: the job against the alternatives


@dataclass(frozen=True)
class Comparison:
    job: JobConfig
    shape: ModelShape
    budget: Budget
    rows: list[Plan]
    """The job first, then the alternatives (full, full + ZeRO-3, + offload, lora, qlora nf4)."""
    recommended: Plan | None


def compare(job: JobConfig, shape: ModelShape, budget: Budget, gpus: int | None = None) -> Comparison:
    gpus = gpus or job.scaling.workers
    rows = [plan(job, shape, budget.device, f"job: {describe(job)}")]
    for overrides in alternatives(gpus):
        changes = _changes(job, overrides)
        if changes:
            variant = _variant(job, changes)
            rows.append(plan(variant, shape, budget.device, describe(variant), changes))
    return Comparison(job, shape, budget, rows, recommend(job, shape, budget, gpus))
