"""The run's record: the manifest (write_manifest, versions), where the wall time went (SPANS, timeline),
the trackers' closing files and tables (finish_tracking, generations_table) and the accuracy line a
finished run prints."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from jobs.metrics_log import METRICS_FILE
from orchestrator.launch.outcome import RunOutcome

MANIFEST = "manifest.json"
LIBRARIES = ("rayft", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "ray", "pyarrow", "accelerate")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest, keeping what an earlier one recorded that this one does not say (a re-export by
    `rayft merge` keeps the run's timings, attempts and search). Written through a temporary file and
    renamed, so a reader sees the old manifest or the new one, never half of one."""
    earlier: dict[str, Any] = {}
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            earlier = {}
    merged = {**earlier, **manifest}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.rename(path)
    return merged


def process_started() -> float:
    """When this process started, as a time.time() value (Linux: /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


# Contiguous spans from the command's start to its end: (name, from stamp, to stamp). Driver stamps come from
# train(); worker stamps from rank 0's records in metrics.jsonl (the same clock on one machine).
SPANS = (
    ("startup_s", "started", "train_called"),  # interpreter, imports, job file, fit check
    ("preflight_s", "train_called", "ray_starting"),  # the run directory (the preflight itself runs on a thread while Ray starts)
    ("ray_init_s", "ray_starting", "ray_ready"),
    # every row checked: a Ray Data pass, or for a small file the driver's own thread, which ran while Ray
    # started: then only what was left of it after ray_ready (cached for resumes and searches)
    ("validation_s", "ray_ready", "data_checked"),
    ("encode_once_s", "data_checked", "encoded_once"),  # every row encoded once, where it fits the disk (jobs/encoded.py)
    ("trainer_build_s", "encoded_once", "trainer_built"),  # import ray.train + torch, batch schedule, datasets, TorchTrainer
    ("worker_start_s", "trainer_built", "worker_started"),  # Ray Train controller, placement group, worker process
    ("data_s", "worker_started", "data_encoded"),  # worker imports, its dataset shards
    ("model_s", "data_encoded", "model_loaded"),  # base (4-bit) + adapters + optimizer (+ checkpoint restored)
    ("initial_eval_s", "model_loaded", "first_step_started"),  # the first batches streamed (+ the step-0 eval with eval.at_start)
    ("first_step_s", "first_step_started", "first_step_done"),
    ("training_s", "first_step_done", "worker_done"),  # the other steps, evals, checkpoints
    ("fit_teardown_s", "worker_done", "fit_returned"),
    ("export_s", "fit_returned", "exported"),  # merge, save, reload, parity check
    ("ray_shutdown_s", "exported", "finished"),
)


def timeline(stamps: dict[str, float], records: list[dict[str, Any]]) -> dict[str, float]:
    """Where the wall time of one run went: the SPANS, start -> first optimizer step, total wall, summed
    optimizer-step time and the overhead (wall - step time) / wall. Uses the last attempt in the records."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    attempt = records[starts[-1] :] if starts else []
    stamps = dict(stamps)
    steps_s = None
    for r in attempt:
        if r.get("event") == "start" and "clock" in r:
            stamps.update(r["clock"])
        elif r.get("event") == "first_step":
            stamps.update(first_step_started=r["time"] - r["step_s"], first_step_done=r["time"])
        elif r.get("event") == "end" and "time" in r:
            stamps["worker_done"], steps_s = r["time"], r["steps_s"]
    out = {name: round(stamps[b] - stamps[a], 3) for name, a, b in SPANS if a in stamps and b in stamps}
    out["fit_s"] = round(stamps["fit_returned"] - stamps["ray_starting"], 3)  # Ray start + training
    out["total_s"] = round(stamps["finished"] - stamps["train_called"], 3)  # train() itself
    wall = stamps["finished"] - stamps["started"]
    out["wall_s"] = round(wall, 3)  # the whole command
    if "first_step_done" in stamps:
        out["start_to_first_step_s"] = round(stamps["first_step_done"] - stamps["started"], 3)
    if steps_s is not None:
        out["steps_s"] = round(steps_s, 3)
        out["overhead_pct"] = round(100 * (wall - steps_s) / wall, 2)
    return out


def finish_tracking(tracker: Any, run_dir: Path, outcome: RunOutcome, records: list[dict[str, Any]]) -> None:
    """The trackers' runs end with the run's files as artifacts (the merged model too where log_model is
    on) and the export's numbers."""
    manifest = outcome.manifest
    parity = manifest.get("parity") or {}
    merged = ((manifest.get("generation") or {}).get("merged") or {}).get("accuracy")
    summary = {"merged_accuracy": parity.get("merged_accuracy"), "merged_generated_accuracy": merged}
    files = [run_dir / n for n in (MANIFEST, "job.yaml", METRICS_FILE, "report.md", "report.png")]
    tracker.finish("finished", files, outcome.model_dir, summary, tables=generations_table(records, manifest))


def generations_table(records: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """eval.generate's answers as one table (step, model, prompt, expected, generated, correct): the trained
    model's at every eval (its metrics.jsonl records), and the merged model's; empty without eval.generate."""
    rows = [(r["step"], "trained", s) for r in records if r.get("event") == "generations" for s in r.get("samples", [])]
    merged = (manifest.get("generation") or {}).get("merged") or {}
    rows += [(manifest["metrics"].get("step"), "merged", s) for s in merged.get("samples", [])]
    if not rows:
        return {}
    columns = ("prompt", "expected", "generated", "correct")
    table = {"step": [step for step, _, _ in rows], "model": [model for _, model, _ in rows]}
    table |= {c: [s.get(c) for _, _, s in rows] for c in columns}
    return {"generations": table}


def accuracy_line(metrics: dict[str, Any]) -> str:
    """The eval accuracy at the exported checkpoint, from the step-0 number where eval.at_start took one."""
    before = metrics.get("initial_eval_accuracy")
    now = f"{metrics['eval_accuracy']:.1%} (eval loss {metrics['eval_loss']:.4f})"
    return f"eval accuracy: {before:.1%} -> {now}" if before is not None else f"eval accuracy: {now}"
