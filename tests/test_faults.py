"""Runs that survive, with real processes: a Ray Train worker SIGKILLed mid-run (found as a user would, by
its process title), a kill during a checkpoint write, SIGTERM to `rayft train`, a SIGKILLed driver whose
Ray processes the next rayft command stops, and a Tune trial whose worker is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import RAYFT

pytestmark = pytest.mark.slow

# 512 rows / 16 a step = 32 an epoch; 96 steps, a checkpoint every 8. A step takes ~25 ms here: the steps
# after 11 (where SIGTERM is sent) must outlast the signal's way to the workers (~0.4 s)
STEPS = 96
SETS = {"train.epochs": 3, "train.max_steps": STEPS, "train.checkpoint_every": 8, "train.eval_every": 8, "train.log_every": 1, "data.eval": None}


def rayft_train(world: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    sets = [x for k, v in {**SETS, "output": str(out / "runs")}.items() for x in ("--set", f"{k}={'null' if v is None else v}")]
    tmpdir(out).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir(out)), "RAYFT_HOME": str(out / "home"), **(env or {})}
    return subprocess.Popen([RAYFT, "train", str(world / "jobs" / "base.yaml"), *sets, "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def tmpdir(out: Path) -> Path:
    """A $TMPDIR of the test's own, short (Ray's socket paths must stay under 107 bytes)."""
    return Path("/tmp") / f"rayft-test-{zlib.crc32(str(out).encode())}"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run_dir: Path, attempt: int | None = None) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records(run_dir) if "train_loss" in r and attempt in (None, r["attempt"])}


def registered_steps(out: Path) -> list[int]:
    for snap in (out / "runs").glob("*/checkpoints/checkpoint_manager_snapshot.json"):
        try:
            return [r["metrics"]["step"] for r in json.loads(snap.read_text())["checkpoint_results"]]
        except (ValueError, KeyError):
            return []
    return []


def run_dir_of(out: Path) -> Path:
    return next(p for p in (out / "runs").iterdir() if not p.name.startswith("."))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"condition not reached (exit {proc.returncode}): {err[-2000:]}")


def pids_titled(prefix: str) -> list[int]:
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if (p / "cmdline").read_bytes().decode(errors="replace").startswith(prefix):
                found.append(int(p.name))
        except OSError:
            pass
    return found


def ray_processes(orphans_only: bool = False) -> list[str]:
    """Ray's processes on this machine (the tests run in their own pid namespace), by title or command
    line; orphans_only: those no longer under this test process (a killed driver's), not the session's Ray."""
    from orchestrator.processes import descendants

    ours = set(descendants([os.getpid()])) if orphans_only else set()
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        if int(p.name) in ours:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "dashboard" in cmd or "runtime_env" in cmd):
            out.append(f"{p.name} {cmd[:80]}")
    return out


@pytest.fixture(scope="module")
def whole(world, tmp_path_factory) -> Path:
    """The uninterrupted run the faulted ones are compared with."""
    out = tmp_path_factory.mktemp("whole")
    proc = rayft_train(world, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert not list(tmpdir(out).glob("rayft-ckpt-*")), "a checkpoint copy was left in $TMPDIR"
    deadline = time.time() + 5  # no Ray process outlives the command by more than a few seconds
    while time.time() < deadline and ray_processes(orphans_only=True):
        time.sleep(0.2)
    assert not ray_processes(orphans_only=True)
    return run_dir_of(out)


def test_a_killed_worker_is_replaced_and_the_run_completes_by_itself(world, whole, tmp_path):
    proc = rayft_train(world, tmp_path)
    wait_for(lambda: 8 in registered_steps(tmp_path), proc)
    workers = pids_titled("ray::RayTrainWorker")
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run_dir = run_dir_of(tmp_path)
    recs = records(run_dir)
    starts = [r for r in recs if r.get("event") == "start"]
    assert [(r["attempt"], r["step"]) for r in starts][0] == (1, 0) and starts[-1]["attempt"] == 2 and starts[-1]["step"] >= 8
    assert max(r["step"] for r in recs) == STEPS and recs[-1]["event"] == "end"
    a, b = losses(whole), losses(run_dir, attempt=2)
    assert b and max(abs(a[s] - b[s]) for s in b) <= 1e-3  # the restarted attempt retraces the uninterrupted run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    first, second = manifest["attempts"]
    assert f"pid {workers[0]}" in first["reason"] and "was lost" in first["reason"]
    assert second["reason"] == "completed" and second["to_step"] == STEPS
    assert (run_dir / "model" / "config.json").is_file()
    first_step = next(r for r in recs if r.get("event") == "first_step" and r["attempt"] == 2)
    print(f"kill -> training again: {first_step['time'] - killed_at:.1f}s")
    assert not list(tmpdir(tmp_path).glob("rayft-ckpt-*"))


def test_a_kill_during_a_checkpoint_write_never_leaves_an_unusable_newest_checkpoint(world, whole, tmp_path):
    """Rank 0 dies halfway through copying step 16's checkpoint into storage: the half-written directory
    is never registered, the restart continues from step 8, and the run ends exactly as the whole one."""
    proc = rayft_train(world, tmp_path, env={"RAYFT_KILL_IN_CHECKPOINT": "16"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run_dir = run_dir_of(tmp_path)
    starts = [r for r in records(run_dir) if r.get("event") == "start"]
    assert [r["step"] for r in starts] == [0, 8]
    a, b = losses(whole), losses(run_dir, attempt=2)
    assert max(abs(a[s] - b[s]) for s in b) <= 1e-3 and max(b) == STEPS


def test_sigterm_checkpoints_the_current_step_exits_143_and_resume_continues(world, whole, tmp_path):
    proc = rayft_train(world, tmp_path)
    wait_for(lambda: any(r.get("step", 0) >= 11 for r in records(run_dir_of(tmp_path))) if (tmp_path / "runs").is_dir() and list((tmp_path / "runs").glob("*/metrics.jsonl")) else False, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    run_dir = run_dir_of(tmp_path)
    stopped = next(r for r in records(run_dir) if r.get("event") == "stopped")
    assert stopped["reason"] == "SIGTERM received" and stopped["step"] >= 11
    assert stopped["step"] in registered_steps(tmp_path)  # a checkpoint of the step it stopped at, off the every-8 cadence
    assert f"--resume {run_dir}" in err and f"the newest checkpoint is of step {stopped['step']}" in err
    resumed = rayft_train(world, tmp_path, "--resume", str(run_dir))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    starts = [r for r in records(run_dir) if r.get("event") == "start"]
    assert starts[-1]["step"] == stopped["step"] and starts[-1]["attempt"] == 2
    a, b = losses(whole), losses(run_dir, attempt=2)
    assert max(abs(a[s] - b[s]) for s in b) <= 1e-3 and max(b) == STEPS
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [i["outcome"] for i in manifest["invocations"]] == ["stopped by SIGTERM", "exported"]
    assert manifest["timings"]["all_attempts_wall_s"] > manifest["invocations"][-1]["wall_s"]


def test_a_worker_killed_by_rays_memory_monitor_is_restarted_and_the_message_says_which_and_how_much(world, tmp_path):
    """Ray's memory monitor (a threshold 7 GiB above what the machine uses now: Ray, the driver and a worker take ~3-4 of them) kills rank 0 when the drill
    RAYFT_OOM_AT_STEP makes it take memory after step 10. Its kill takes Ray Train's controller and helper actors
    too (Ray 2.60), which left Ray Train failing for good ("max allowed: 0") with Ray's boilerplate as the only
    message. Now rayft starts the run again from its newest checkpoint (step 8) like any lost worker, within
    scaling.max_failures: 1, the second kill ends it, and both say which worker and how much memory in a sentence."""
    import psutil

    vm = psutil.virtual_memory()
    threshold = (vm.total - vm.available + 7 * 2**30) / vm.total
    proc = rayft_train(world, tmp_path, "--set", "scaling.max_failures=1", env={"RAY_memory_usage_threshold": f"{threshold:.3f}", "RAYFT_OOM_AT_STEP": "10"})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    run_dir = run_dir_of(tmp_path)
    killed = r"(worker 0|a worker) \(pid \d+, node [\d.]+\) was killed by Ray's memory monitor: the node has [\d.]+ GB and its processes used [\d.]+ GB"
    assert re.search(killed + r".*\nrestarting from the checkpoint of step 8 \(1 of scaling.max_failures: 1\)", out), out[-3000:]
    assert re.search("training failed: " + killed, err), err[-3000:]
    assert "2 attempt(s) failed (scaling.max_failures: 1)" in err
    assert f"the newest checkpoint is of step 8; continue with: rayft train {world / 'jobs' / 'base.yaml'} --resume {run_dir}" in err
    assert "Refer to the documentation" not in err + out  # Ray's boilerplate stays in ray.log
    assert [r["step"] for r in records(run_dir) if r.get("event") == "start"] == [0, 8]  # the restart continued from the checkpoint


def test_the_ray_processes_of_a_killed_driver_are_stopped_by_the_next_command(world, tmp_path):
    proc = rayft_train(world, tmp_path)
    wait_for(lambda: bool(list((tmp_path / "runs").glob("*/metrics.jsonl"))), proc)
    assert ray_processes()
    proc.kill()
    proc.wait()
    nxt = rayft_train(world, tmp_path / "next", "--set", "train.max_steps=8", env={"RAYFT_HOME": str(tmp_path / "home")})
    _, err = nxt.communicate(timeout=600)
    assert nxt.returncode == 0, err[-3000:]
    deadline = time.time() + 10
    while time.time() < deadline and ray_processes(orphans_only=True):
        time.sleep(0.5)
    assert not ray_processes(orphans_only=True)


def test_a_trial_whose_worker_is_killed_is_retried_and_the_search_completes(quickstart_run, tmp_path):
    from test_tune import search_file

    # one trial: that a search goes on past a trial that failed for good is test_tune's failing-trial test
    path = search_file(quickstart_run, tmp_path, num_samples=1, scheduler="fifo", max_concurrent=1, space={"train.lr": {"grid": [5e-3]}})
    body = yaml.safe_load(path.read_text())
    body["train"].update(max_steps=16, checkpoint_every=8, eval_every=8)
    # rows encoded as they stream (Ray Data's tasks, launched from the trial's actor), not read encoded once:
    # the trial's other data path, which test_tune's searches do not take
    body["data"]["encode_once"] = "off"
    path.write_text(yaml.safe_dump(body))
    proc = subprocess.Popen([RAYFT, "tune", str(path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def first_trial_checkpointed() -> bool:  # the trial's checkpoint directories are named when complete
        return bool(list((tmp_path / "runs").glob("*/trials/*/checkpoints/checkpoint_000008/metrics.json")))

    wait_for(first_trial_checkpointed, proc, timeout=600)
    # a trial of one worker on one machine is trained in Tune's trial actor itself (no Ray Train worker)
    assert not pids_titled("ray::RayTrainWorker")
    workers = pids_titled("ray::ImplicitFunc")
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out[out.index("{\n") :])
    assert [t["status"] for t in summary["trials"]] == ["finished"]
    trials = Path(summary["best_model"]).parents[1] / "trials"
    starts = {t.name: [(r["attempt"], r["step"]) for r in records(t) if r.get("event") == "start"] for t in trials.iterdir()}
    assert list(starts.values()) == [[(1, 0), (2, 8)]], starts  # the killed trial took over at its step-8 checkpoint
    assert {(r["runner"], r["stream"]) for t in trials.iterdir() for r in records(t) if r.get("event") == "start"} == {("tune_trial", "ray_data")}
    # Tune restarted it (tune.max_failures); why its first attempt ended is recorded, naming the lost process
    failures = [json.loads(x) for t in trials.iterdir() for x in (t / "failures.jsonl").read_text().splitlines()]
    assert [f["attempt"] for f in failures] == [1] and f"pid {workers[0]}" in failures[0]["reason"] and "was lost" in failures[0]["reason"], failures
    assert all(max(r["step"] for r in records(t)) == 16 for t in trials.iterdir())
