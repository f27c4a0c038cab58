"""Each trial's memory per worker: the planner's prediction, written to trials/<trial>/memory.json before
the trial launches (write_trial_memory), and the peaks its metrics.jsonl records (trial_memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.metrics_log import read_metrics

if TYPE_CHECKING:
    from orchestrator.config import JobConfig
    from orchestrator.planner import Budget

MEMORY = "memory.json"  # in a trial directory: the planner's predicted bytes per worker, and on which device
GiB = 2**30
MiB = 2**20


def write_trial_memory(job: JobConfig, trial_dir: Path, budget: Budget | None) -> dict[str, Any]:
    """trial_dir/memory.json: the planner's predicted total per worker for this trial's job on the budget's
    device (the one its fit check uses; without a budget, this machine's), or null with predicted_error
    when the planner cannot read the model."""
    from orchestrator import planner

    device = budget.device if budget is not None else planner.budget_for(job).device
    out: dict[str, Any] = {"device": device, "predicted_bytes": None}
    try:
        out["predicted_bytes"] = planner.plan(job, planner.load_shape(job.model_dir), device).total
    except Exception as e:  # PlanError (no config.json), an architecture outside the matrix: a report never fails a trial
        out["predicted_error"] = str(e)
    (trial_dir / MEMORY).write_text(json.dumps(out, indent=2))
    return out


def trial_memory(trial_dir: Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A trial's memory per worker: predicted (memory.json) and measured (the largest peak its train
    records carry, all from rank 0's worker).

    On GPU the measured number is torch.cuda.max_memory_allocated ("cuda_peak"), close to what the
    planner predicts (the CUDA context and the allocator's cache aside). On CPU it is the peak RSS of
    the whole worker process ("host_rss": Python, torch, Ray and the data stream as well as the model),
    while the prediction is the model's training memory (plus the planner's flat allowance for the
    runtime): on CPU the two are not the same quantity, and one does not check the other."""
    try:
        saved = json.loads((trial_dir / MEMORY).read_text())
    except (OSError, ValueError):
        saved = {}
    records = read_metrics(trial_dir) if records is None else records  # summarize passes what it read
    cuda = [r["cuda_peak_mib"] for r in records if isinstance(r.get("cuda_peak_mib"), int | float)]
    rss = [r["peak_rss_mib"] for r in records if isinstance(r.get("peak_rss_mib"), int | float)]
    device = saved.get("device")
    if cuda and device in ("gpu", None):
        measured, kind = max(cuda) * MiB, "cuda_peak"
    elif rss:
        measured, kind = max(rss) * MiB, "host_rss"
    else:
        measured, kind = None, None
    return {"device": device, "predicted_bytes": saved.get("predicted_bytes"),
            "measured_bytes": None if measured is None else int(measured), "measured_kind": kind}


def predicted(t: dict[str, Any]) -> int | None:
    """A summarized trial's predicted bytes per worker, or None."""
    return (t.get("memory") or {}).get("predicted_bytes")


def gib(n: float | None) -> str:
    """Bytes as GiB for a table cell; "" for None."""
    # three decimals under 10 GiB: small models' trials differ by MiB, which two decimals would hide
    return "" if n is None else f"{n / GiB:.3f}" if n < 10 * GiB else f"{n / GiB:.2f}"
