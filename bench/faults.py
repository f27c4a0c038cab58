"""What a user sees after each fault, and how long until training again, at two model sizes.

    scripts/netns.sh .venv/bin/python bench/faults.py [--sizes tiny,51m]

Full fine-tuning of a LLaVA-style model (the quickstart's tiny one, and a 51M one: hidden 512 x 8 layers)
on the quickstart's colour data, 1 worker, a checkpoint every 8 steps, through the CLI:
- worker: SIGKILL the process titled ray::RayTrainWorker after the step-8 checkpoint (scaling.max_failures
  restarts it): seconds from the kill to the next attempt's first optimizer step, steps lost (run twice);
- sigterm: SIGTERM to `rayft train` after step 11: seconds to exit, exit code, the checkpoint's step; then
  `--resume`: seconds from the command to its first optimizer step;
- driver: SIGKILL `rayft train`; the Ray processes it leaves; the next `rayft train` stops them (how long
  until none is left).
Results: bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_result

RAYFT = str(Path(sys.executable).parent / "rayft")
SIZES = {"tiny": {}, "51m": {"hidden": 512, "layers": 8}}


def build(root: Path, size: str) -> Path:
    from orchestrator import quickstart, tinymodels

    quickstart.build(root)
    if SIZES[size]:
        tinymodels.build_tiny_llava(root / "init", **SIZES[size])
    return root / "jobs" / "base.yaml"


def train(job: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`rayft train` of 96 steps (a tiny step is ~25 ms: fewer end before a signal sent after step 11 arrives)."""
    sets = {"output": str(out / "runs"), "train.max_steps": 96, "train.checkpoint_every": 8, "train.eval_every": 8, "train.log_every": 1, "data.eval": "null"}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "RAYFT_HOME": str(out / "home")}
    return subprocess.Popen([RAYFT, "train", str(job), *args, "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def records(out: Path) -> list[dict[str, Any]]:
    from jobs.metrics_log import METRICS_FILE, read_metrics

    files = list((out / "runs").glob(f"*/{METRICS_FILE}"))
    return read_metrics(files[0].parent) if files else []


def registered(out: Path) -> list[int]:
    for snap in (out / "runs").glob("*/checkpoints/checkpoint_manager_snapshot.json"):
        try:
            return [r["metrics"]["step"] for r in json.loads(snap.read_text())["checkpoint_results"]]
        except (ValueError, KeyError):
            pass
    return []


def wait(predicate, proc: subprocess.Popen) -> None:
    while proc.poll() is None and not predicate():
        time.sleep(0.1)
    if proc.poll() is not None:
        raise RuntimeError(proc.communicate()[1][-2000:])


def titled(prefix: str) -> list[int]:
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if (p / "cmdline").read_bytes().decode(errors="replace").startswith(prefix):
                out.append(int(p.name))
        except OSError:
            pass
    return out


def first_step(recs: list[dict[str, Any]], attempt: int) -> float:
    return next(r["time"] for r in recs if r.get("event") == "first_step" and r.get("attempt") == attempt)


def worker_kill(job: Path, out: Path) -> dict[str, Any]:
    proc = train(job, out)
    wait(lambda: 8 in registered(out), proc)
    os.kill(titled("ray::RayTrainWorker")[0], signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate()
    recs = records(out)
    reached = max(r["step"] for r in recs if r.get("attempt") == 1)
    takeover = next(r["step"] for r in recs if r.get("event") == "start" and r["attempt"] == 2)
    return {"exit": proc.returncode, "kill_to_training_s": round(first_step(recs, 2) - killed, 1), "steps_lost": reached - takeover,
            "final_step": max(r["step"] for r in recs), "message": err.strip().splitlines()[-1] if err.strip() else ""}


def sigterm(job: Path, out: Path) -> dict[str, Any]:
    proc = train(job, out)
    wait(lambda: any(r.get("step", 0) >= 11 for r in records(out)), proc)
    sent_at_step = max(r.get("step", 0) for r in records(out))
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate()
    exit_s = time.time() - sent
    stopped = next((r for r in records(out) if r.get("event") == "stopped"), None)
    if stopped is None:  # the run ended before the signal reached it
        return {"exit": proc.returncode, "step_at_signal": sent_at_step, "finished_before_the_signal": True}
    run_dir = next(p for p in (out / "runs").iterdir() if not p.name.startswith("."))
    t0 = time.time()
    resumed = train(job, out, "--resume", str(run_dir))
    resumed.communicate()
    return {"exit": proc.returncode, "signal_to_exit_s": round(exit_s, 1), "step_at_signal": sent_at_step, "checkpoint_step": stopped["step"],
            "resume_exit": resumed.returncode, "resume_to_training_s": round(first_step(records(out), 2) - t0, 1), "message": err.strip().splitlines()[-1]}


def ray_leftovers() -> list[int]:
    me = os.getpid()
    return [p for p in titled("ray::") if p != me]


def driver_kill(job: Path, out: Path) -> dict[str, Any]:
    proc = train(job, out)
    wait(lambda: bool(records(out)), proc)
    proc.kill()
    proc.wait()
    time.sleep(2)
    left = len(ray_leftovers())
    t0 = time.time()
    nxt = train(job, out / "next")
    wait(lambda: bool(records(out / "next")), nxt)  # the sweep ran before its Ray started
    nxt.communicate()
    deadline = time.time() + 30
    while time.time() < deadline and ray_leftovers():
        time.sleep(0.2)
    return {"ray_processes_left_by_killed_driver": left, "left_after_next_command": len(ray_leftovers()), "next_command_s": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,51m")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix="rayft-faults-") as tmp:
            job = build(Path(tmp) / "world", size)
            result[size] = {
                "worker": worker_kill(job, Path(tmp) / "worker"),
                "sigterm": sigterm(job, Path(tmp) / "sigterm"),
                "driver": driver_kill(job, Path(tmp) / "driver"),
            }
        print(size, json.dumps(result[size], indent=1), flush=True)
    sizes = list(result)
    if len(sizes) == 2:
        a, b = (result[s] for s in sizes)
        print(f"kill -> training again: {a['worker']['kill_to_training_s']}s ({sizes[0]}) vs {b['worker']['kill_to_training_s']}s ({sizes[1]}): "
              f"{b['worker']['kill_to_training_s'] / a['worker']['kill_to_training_s']:.2f}x")
    write_result("faults", result)


if __name__ == "__main__":
    main()
