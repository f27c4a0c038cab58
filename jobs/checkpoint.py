"""Where Ray Train keeps a run's checkpoints (RUN_DIR/checkpoints) and which of them count: the one place
that reads Ray Train's checkpoint snapshot. The driver, the resume path, the export and the fault drill all
ask here."""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints: Ray Train's storage (RunConfig name)
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered

# What one checkpoint directory holds (written by jobs/train_loop.py; a ZeRO run's also holds DeepSpeed's own
# files, jobs/zero.py): the trained weights (lora/qlora adapters, or every weight of a non-ZeRO full run),
# the optimizer/scheduler/RNG state, and the step and metrics at which it was taken.
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "metrics.json"


def registered_checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> directory of every checkpoint Ray Train registered in run_dir (it registers one only after
    its copy into storage is complete; a directory left by a kill during the copy is not among them)."""
    snapshot = run_dir / CHECKPOINTS / SNAPSHOT
    if not snapshot.is_file():
        return {}
    results = json.loads(snapshot.read_text()).get("checkpoint_results") or []
    found = {int(r["metrics"]["step"]): run_dir / CHECKPOINTS / r["checkpoint_dir_name"] for r in results if "step" in (r.get("metrics") or {})}
    return {step: path for step, path in found.items() if path.is_dir()}


def kept_checkpoints(run_dir: Path) -> dict[int, str]:
    """step -> directory of every checkpoint still in run_dir's storage (Ray Train deletes those past
    train.keep_checkpoints), read from each one's META_FILE."""
    return {json.loads(meta.read_text())["step"]: str(meta.parent) for meta in (run_dir / CHECKPOINTS).glob(f"checkpoint_*/{META_FILE}")}


def resume_step(run_dir: Path) -> int:
    """The step of the checkpoint Ray Train restores in run_dir (its latest registered one), or 0."""
    snapshot = run_dir / CHECKPOINTS / SNAPSHOT
    if not snapshot.is_file():
        return 0
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    meta = run_dir / CHECKPOINTS / latest / META_FILE if latest else None
    return int(json.loads(meta.read_text())["step"]) if meta and meta.is_file() else 0


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The registered checkpoint of the highest step (full, LoRA and ZeRO alike), or None."""
    registered = registered_checkpoints(run_dir)
    return registered[max(registered)] if registered else None
