"""Where a job runs: an embedded local Ray (the default), or the cluster a submitted job runs on. Owns the run
directory, Ray's log file, the progress display, the export and the manifest. Heavy imports (torch, ray)
stay inside functions. Which file holds what, each importing only the ones above it:

  outcome.py      how a run ends: RunOutcome, RunFailed, Interrupted, failure_message
  localray.py     the embedded local Ray (ensure_local_ray, shutdown_ray, data_cpus), this process's output
                  sent to ray.log (output_to)
  capacity.py     what the workers can use, read from Ray's nodes (Capacity), and what each reserves
                  (resources_for, training_cpus)
  progress.py     the live progress display (ProgressView)
  record.py       the run's record: manifest.json (write_manifest, versions), the timings (SPANS, timeline,
                  process_started), the trackers' closing files and tables (finish_tracking,
                  generations_table), the accuracy line (accuracy_line)
  export.py       a checkpoint merged into RUN_DIR/model and its manifest (export_run, latest_checkpoint,
                  finished)
  data_checks.py  the data checks before training (preflight, checked, DataPass, data_cache) and
                  `rayft validate`'s (validate_data)
  run.py          one run, start to end (train, new_run_dir)

This module re-exports every public name of the parts, so callers use `launch.train`, `launch.RunFailed`, ...
"""

from orchestrator.launch.capacity import Capacity, resources_for, training_cpus
from orchestrator.launch.data_checks import DataPass, checked, data_cache, preflight, validate_data
from orchestrator.launch.export import MODEL_DIR, export_run, finished, latest_checkpoint
from orchestrator.launch.localray import data_cpus, ensure_local_ray, output_to, shutdown_ray
from orchestrator.launch.outcome import Interrupted, RunFailed, RunOutcome, failure_message
from orchestrator.launch.progress import ProgressView
from orchestrator.launch.record import (
    LIBRARIES,
    MANIFEST,
    SPANS,
    accuracy_line,
    finish_tracking,
    generations_table,
    process_started,
    timeline,
    versions,
    write_manifest,
)
from orchestrator.launch.run import new_run_dir, train

__all__ = [
    "LIBRARIES",
    "MANIFEST",
    "MODEL_DIR",
    "SPANS",
    "DataPass",
    "Interrupted",
    "ProgressView",
    "RunFailed",
    "RunOutcome",
    "accuracy_line",
    "checked",
    "data_cache",
    "data_cpus",
    "ensure_local_ray",
    "export_run",
    "failure_message",
    "finish_tracking",
    "finished",
    "generations_table",
    "latest_checkpoint",
    "new_run_dir",
    "output_to",
    "preflight",
    "process_started",
    "resources_for",
    "training_cpus",
    "Capacity",
    "shutdown_ray",
    "timeline",
    "train",
    "validate_data",
    "versions",
    "write_manifest",
]
