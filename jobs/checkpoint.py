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


def store(run_dir: Path, staged: str, step: int) -> Path:
    """Copy a staged checkpoint into RUN_DIR/checkpoints/checkpoint_<step> where no Ray Train storage holds it (a
    search trial run in Tune's own actor: jobs/tune_worker.py; jobs/local_worker.py). It is copied under a name
    kept_checkpoints does not match and renamed when complete, so a kill during the copy leaves no checkpoint
    that counts (as Ray Train registers one only once its copy is complete)."""
    import shutil

    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    dest, partial = root / f"checkpoint_{step:06d}", root / f".partial_{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(staged, partial)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def prune(run_dir: Path, keep: int | None, score: str | None) -> list[int]:
    """Delete the checkpoints past `keep` (train.keep_checkpoints; None keeps all) from RUN_DIR/checkpoints, as Ray
    Train's CheckpointConfig does: the best `keep` by `score` ("metric:max|min"; None: the newest) stay, and
    the newest always stays (a restart continues from it). Returns the steps deleted."""
    import shutil

    kept = kept_checkpoints(run_dir)
    if keep is None or len(kept) <= keep:
        return []
    metas = {step: json.loads((Path(path) / META_FILE).read_text()) for step, path in kept.items()}
    if score:
        metric, mode = score.split(":")
        worst = float("-inf") if mode == "max" else float("inf")
        sign = 1 if mode == "max" else -1
        ranked = sorted(kept, key=lambda s: (sign * metas[s].get(metric, worst), s), reverse=True)
    else:
        ranked = sorted(kept, reverse=True)
    stay = set(ranked[:keep]) | {max(kept)}
    gone = sorted(set(kept) - stay)
    for step in gone:
        shutil.rmtree(kept[step], ignore_errors=True)
    return gone


def newest(run_dir: Path) -> Path | None:
    """The kept checkpoint of the highest step in RUN_DIR/checkpoints (stored by `store`), or None."""
    kept = kept_checkpoints(run_dir)
    return Path(kept[max(kept)]) if kept else None
