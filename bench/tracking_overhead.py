"""What tracking costs a run: the steady-state optimizer-step time of the quickstart's QLoRA job with no
tracker, with TensorBoard (the default), and with TensorBoard + MLflow (a real `mlflow server` on loopback).

    scripts/netns.sh .venv/bin/python bench/tracking_overhead.py [QUICKSTART_DIR] [--rounds 3] [--epochs 4]

Each round runs `rayft train` through the CLI (embedded local Ray) for each contender in turn (A B C A B C:
a noisy machine slows all, not one). The step time is the median over the run's report windows (1 /
steps_per_s of each train/eval record, which excludes evals and checkpoints), leaving out the first two
windows (warm-up). train.log_every=1 makes every step a record to forward: the trackers' worst case.
Needs the MLflow server venv that `make test` builds (.venv/mlflow-server). Results: bench/results/tracking_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import REPO, alternate, ratio, write_result

RAYFT = str(Path(sys.executable).parent / "rayft")
SERVER = Path(os.environ.get("RAYFT_MLFLOW_SERVER", REPO / ".venv" / "mlflow-server" / "bin" / "mlflow"))


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(SERVER), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def run(job_file: Path, out: Path, sets: list[str]) -> dict[str, Any]:
    args = [RAYFT, "train", str(job_file), "--no-progress", "--json", "--set", f"output={out}"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    manifest = json.loads(proc.stdout[proc.stdout.index("{\n") :])  # --json prints the manifest
    run_dir = Path(manifest["run_dir"])
    from jobs.metrics_log import read_metrics

    records = read_metrics(run_dir)
    windows = [1 / r["steps_per_s"] for r in records if r.get("event") in ("train", "eval") and r.get("steps_per_s")]
    steady = windows[2:] or windows
    state = json.loads((run_dir / "tracking.json").read_text()) if (run_dir / "tracking.json").is_file() else {}
    if state.get("warnings"):
        raise RuntimeError(f"a tracker failed: {state['warnings']}")
    cost = state.get("cost", {})
    steps = manifest["metrics"]["step"] or 1
    return {
        "step_ms": 1000 * statistics.median(steady),
        "windows": len(steady),
        "run_wall_s": manifest["timings"]["wall_s"],
        # the driver's tracking thread, measured directly: CPU per optimizer step it forwarded, and its open
        # (client import + run creation, overlapping Ray's start) and finish (artifacts) wall time
        "tracker_cpu_ms_per_step": 1000 * cost.get("cpu_s", 0.0) / steps,
        "tracker_open_s": cost.get("open_s", 0.0),
        "tracker_finish_s": cost.get("finish_s", 0.0),
    }


def spread(contender: dict[str, Any]) -> str:
    """min-max of a contender's step time over its rounds: the machine's noise, beside the medians."""
    steps = [r["step_ms"] for r in contender["runs"]]
    return f"{min(steps):.0f}-{max(steps):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("quickstart", nargs="?", default=str(REPO / "quickstart"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    job_file = Path(args.quickstart) / "jobs" / "qlora.yaml"
    common = [f"train.epochs={args.epochs}", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000"]
    with tempfile.TemporaryDirectory(prefix="rayft-bench-tracking-") as tmp:
        root = Path(tmp)
        server, uri = start_server(root)
        try:
            contenders = {
                "none": lambda: run(job_file, root / "runs", [*common, "tracking.tensorboard=false"]),
                "tensorboard": lambda: run(job_file, root / "runs", common),
                "tensorboard+mlflow": lambda: run(job_file, root / "runs", [*common, f"tracking.mlflow.tracking_uri={uri}", "tracking.mlflow.experiment=bench"]),
            }
            rows = alternate(contenders, rounds=args.rounds)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    base = rows["none"]["median"]["step_ms"]
    mlflow = rows["tensorboard+mlflow"]["median"]
    summary = [
        {"benchmark": "tracking overhead", "measure": "tracking thread CPU per step, tensorboard+mlflow (ms) vs step time (ms)",
         "rayft": round(mlflow["tracker_cpu_ms_per_step"], 3), "baseline": round(base, 2), "ratio": ratio(mlflow["tracker_cpu_ms_per_step"], base),
         "note": "measured in the driver's thread (time.thread_time)"},
        *[{"benchmark": "tracking overhead", "measure": f"steady-state step time, {name} vs none (ms)", "rayft": round(rows[name]["median"]["step_ms"], 2),
         "baseline": round(base, 2), "ratio": ratio(rows[name]["median"]["step_ms"], base), "note": f"quickstart QLoRA job, log_every=1, 1 worker; rounds ranged {spread(rows[name])}, none's {spread(rows['none'])}"}
          for name in ("tensorboard", "tensorboard+mlflow")],
    ]
    write_result("tracking_overhead", {"contenders": rows, "epochs": args.epochs, "rounds": args.rounds}, summary=summary)
    print("| contender | step ms (median of rounds) | vs none | tracker CPU ms/step | open s | finish s |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        m = r["median"]
        print(f"| {name} | {m['step_ms']:.2f} | {ratio(m['step_ms'], base)} | {m['tracker_cpu_ms_per_step']:.3f} | {m['tracker_open_s']:.2f} | {m['tracker_finish_s']:.2f} |")


if __name__ == "__main__":
    main()
