"""The export of a finished run: its newest checkpoint merged into RUN_DIR/model (on the driver or as a Ray
task) and manifest.json written beside it (export_run)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jobs.metrics_log import read_metrics
from orchestrator.config import JobConfig
from orchestrator.launch.localray import ensure_local_ray, output_to, shutdown_ray
from orchestrator.launch.outcome import RunFailed, RunOutcome
from orchestrator.launch.record import MANIFEST, versions, write_manifest

MODEL_DIR = "model"


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
        # the base as trained: a hub id's commit (every node loaded that snapshot), or the local directory
        "base_model": {"model": job.model, "revision": job.model_revision, "files": job.model_dir},
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
