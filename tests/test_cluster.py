"""`rayft cluster` and `rayft submit/status/logs/stop/list` against a real two-node Ray cluster on loopback
(`ray start --head` + a joined node, token auth on), inside the test run's private network namespace."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import RAYFT, REPO, clean_reload_accuracy

ADDRESS = "http://127.0.0.1:8275"  # not Ray's default ports: other tests' embedded Rays may hold those


def rayft(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([RAYFT, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cluster")
    up = rayft("cluster", "up", "--dir", str(directory), "--nodes", "2", "--cpus-per-node", "1", "--port", "6391", "--dashboard-port", "8275", timeout=360)
    assert up.returncode == 0, up.stderr + up.stdout
    token_path = directory / "auth_token"
    env = {"RAY_AUTH_TOKEN_PATH": str(token_path)}
    yield {"dir": directory, "env": env, "token": token_path.read_text().strip(), "up": up.stdout}
    state = json.loads((directory / "cluster.json").read_text())
    down = rayft("cluster", "down", "--dir", str(directory), timeout=120)
    assert down.returncode == 0, down.stderr
    left = cluster_processes(directory, {p["pid"] for p in state["processes"]})  # the moment down returned
    assert not left, f"processes of the cluster still running after `cluster down`: {left}\n{down.stdout}"
    assert re.fullmatch(r"stopped 2 Ray node\(s\) in [\d.]+s; all \d+ processes exited \(\d+ needed SIGKILL\)\n", down.stdout), down.stdout
    assert not (directory / "cluster.json").exists()


def running() -> dict[int, list[str]]:
    """pid -> /proc stat fields (state, ppid, pgrp, session, ...) of every process that is not a zombie."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(proc.name)] = fields
    return out


def cluster_processes(directory: Path, sessions: set[int]) -> dict[int, str]:
    """Running processes of the cluster in directory: those in one of its sessions or process groups (a
    node's `ray start` leads one; Ray's workers make their own group but keep the session) and those whose
    environment names the cluster's token file (a job's driver, in a session of its own) -> command."""
    tag = f"RAY_AUTH_TOKEN_PATH={directory / 'auth_token'}".encode()
    found = {}
    for pid, fields in running().items():
        try:
            marked = tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if marked or int(fields[2]) in sessions or int(fields[3]) in sessions:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:  # it has just exited
            continue
    return found


def test_up_that_times_out_stops_what_it_started_and_shows_the_failing_nodes_log(tmp_path):
    directory = tmp_path / "cluster"
    sessions_before = {int(fields[3]) for fields in running().values()}
    t0 = time.time()
    up = rayft("cluster", "up", "--dir", str(directory), "--cpus-per-node", "1", "--port", "6393", "--dashboard-port", "8277", "--timeout", "1", timeout=120)
    took = time.time() - t0
    assert up.returncode == 1, up.stdout + up.stderr
    assert "head did not come up within 1s" in up.stderr and "--timeout" in up.stderr
    log = directory / "head.log"
    assert f"{log} ends:" in up.stderr  # names the node's log file, then shows its tail
    last = log.read_text().strip().splitlines()[-1:] or ["(empty)"]
    assert up.stderr.rstrip().endswith(last[0]), up.stderr
    # no process of it is left: not in a session started since (each node leads one), nor carrying its token path
    new_sessions = {int(fields[3]) for fields in running().values()} - sessions_before
    assert not cluster_processes(directory, new_sessions), up.stderr
    assert not (directory / "cluster.json").exists()
    assert took < 60, f"`cluster up --timeout 1` took {took:.0f}s"


def job_file(quickstart_run, tmp_path: Path, epochs: int = 1) -> Path:
    root = Path(quickstart_run["root"])
    body = yaml.safe_load((REPO / "examples" / "qlora-nf4.yaml").read_text())
    body["model"] = str(root / "base")
    body["data"].update(train=str(root / "data/french_train.parquet"), eval=str(root / "data/french_eval.parquet"))
    body["train"].update(epochs=epochs, eval_every=8, checkpoint_every=8)
    body["scaling"] = {"workers": 1, "cpus_per_worker": 1}
    body["submit"] = {"storage_path": str(tmp_path / "storage"), "ship": ["model", "data"]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_cluster_is_two_loopback_nodes_with_a_private_token(cluster):
    assert stat.S_IMODE((cluster["dir"] / "auth_token").stat().st_mode) == 0o600
    assert cluster["token"] not in cluster["up"]
    out = rayft("cluster", "status", "--dir", str(cluster["dir"]), "--json")
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)["nodes"]
    assert len(nodes) == 2 and all(n["state"] == "ALIVE" and n["node_ip"] == "127.0.0.1" for n in nodes)
    assert cluster["token"] not in out.stdout


@pytest.mark.slow
def test_submitted_job_succeeds_and_its_model_lands_in_storage(cluster, quickstart_run, tmp_path):
    path = job_file(quickstart_run, tmp_path)
    sub = rayft("submit", str(path), "--address", ADDRESS, "--json", env=cluster["env"])
    assert sub.returncode == 0, sub.stderr + sub.stdout
    submitted = json.loads(sub.stdout)
    assert submitted["results"].startswith(str(tmp_path / "storage"))
    # logs --follow streams while the job runs and returns when it ends
    follow = rayft("logs", submitted["job_id"], "--follow", "--address", ADDRESS, env=cluster["env"], timeout=600)
    assert follow.returncode == 0, follow.stderr
    assert "rayft: inputs ok" in follow.stdout and "step 8: eval" in follow.stdout and "rayft: merged model" in follow.stdout
    status = rayft("status", submitted["job_id"], "--address", ADDRESS, "--json", env=cluster["env"])
    row = json.loads(status.stdout)
    assert row["status"] == "SUCCEEDED" and row["results"] == submitted["results"]
    run_dir = Path(submitted["results"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and not (run_dir / "model.partial").exists()
    accuracy = clean_reload_accuracy(run_dir / "model", str(Path(quickstart_run["root"]) / "data/french_eval.parquet"))
    assert abs(accuracy - manifest["metrics"]["eval_accuracy"]) <= 0.05
    listed = json.loads(rayft("list", "--address", ADDRESS, "--json", env=cluster["env"]).stdout)
    assert submitted["job_id"] in [r["job_id"] for r in listed]
    # the token appears in no output and in no file the job wrote
    token = cluster["token"]
    for text in (sub.stdout, sub.stderr, follow.stdout, follow.stderr, status.stdout):
        assert token not in text
    for f in run_dir.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert token.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_stop_mid_run_leaves_no_half_written_model(cluster, quickstart_run, tmp_path):
    path = job_file(quickstart_run, tmp_path, epochs=6)
    sub = rayft("submit", str(path), "--address", ADDRESS, "--json", env=cluster["env"])
    assert sub.returncode == 0, sub.stderr + sub.stdout
    job = json.loads(sub.stdout)
    deadline = time.time() + 300
    while "step 8: eval" not in rayft("logs", job["job_id"], "--address", ADDRESS, env=cluster["env"]).stdout:
        assert time.time() < deadline, "the job never reached step 8"
        time.sleep(2)
    stop = rayft("stop", job["job_id"], "--address", ADDRESS, env=cluster["env"])
    assert stop.returncode == 0 and stop.stdout.strip().endswith("STOPPED"), stop.stdout + stop.stderr
    run_dir = Path(job["results"])
    assert (run_dir / "checkpoints").is_dir()  # what it had trained is kept
    assert not (run_dir / "model").exists() and not (run_dir / "manifest.json").exists()


@pytest.mark.slow
def test_a_killed_driver_is_started_again_and_resumes_from_its_checkpoint(cluster, quickstart_run, tmp_path):
    """SIGKILL the job's driver process on the cluster after its step-8 checkpoint: the entrypoint starts a
    new driver (submit.driver_retries), which resumes the run directory instead of starting over."""
    path = job_file(quickstart_run, tmp_path, epochs=1)
    sub = rayft("submit", str(path), "--address", ADDRESS, "--json", env=cluster["env"])
    assert sub.returncode == 0, sub.stderr + sub.stdout
    job = json.loads(sub.stdout)
    run_dir = Path(job["results"])

    def registered() -> list[int]:
        snap = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
        try:
            return [r["metrics"]["step"] for r in json.loads(snap.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            return []

    def driver() -> int | None:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if b"RAYFT_DRIVER_ATTEMPT=1" in (proc / "environ").read_bytes() and b"jobs.entrypoint" in (proc / "cmdline").read_bytes():
                    return int(proc.name)
            except OSError:
                pass
        return None

    deadline = time.time() + 300
    while 8 not in registered():
        assert time.time() < deadline, "no step-8 checkpoint in time"
        time.sleep(0.5)
    pid = driver()
    assert pid is not None
    os.kill(pid, 9)
    follow = rayft("logs", job["job_id"], "--follow", "--address", ADDRESS, env=cluster["env"], timeout=600)
    assert "the driver died (exit -9); starting it again" in follow.stdout, follow.stdout[-3000:]
    assert "already holds this run: resuming from the checkpoint of step" in follow.stdout
    status = json.loads(rayft("status", job["job_id"], "--address", ADDRESS, "--json", env=cluster["env"]).stdout)
    assert status["status"] == "SUCCEEDED", follow.stdout[-3000:]
    starts = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "start"' in x]
    assert starts[0]["step"] == 0 and starts[-1]["step"] >= 8 and starts[-1]["attempt"] == len(starts)
    assert (run_dir / "manifest.json").is_file()


def test_a_wrong_or_missing_token_is_refused_naming_the_fix(cluster, tmp_path):
    wrong = rayft("list", "--address", ADDRESS, env={"RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode == 1
    assert "rejected the token from RAY_AUTH_TOKEN (HTTP 403)" in wrong.stderr and "RAY_AUTH_TOKEN_PATH" in wrong.stderr
    missing = rayft("list", "--address", ADDRESS, env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": ""})
    assert missing.returncode == 1 and "requires a token (HTTP 401)" in missing.stderr


def test_plain_http_to_another_host_without_a_token_is_refused(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: /nonexistent\ndata: {train: /nonexistent.parquet}\n")
    out = rayft("submit", str(job), "--address", "http://10.1.2.3:8265", env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": ""})
    assert out.returncode == 2 and "--insecure" in out.stderr and "without a token" in out.stderr


def test_an_input_that_is_not_there_fails_at_submit_naming_it(cluster, quickstart_run, tmp_path):
    path = job_file(quickstart_run, tmp_path)
    out = rayft("submit", str(path), "--address", ADDRESS, "--set", "data.train=missing.parquet", env=cluster["env"])
    assert out.returncode == 2 and "data.train" in out.stderr and "missing.parquet" in out.stderr


def test_cluster_files_agree():
    files = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (REPO / "cluster").glob("*.yaml")}
    runtime_env = files["runtime_env.yaml"][0]
    launcher = files["rayft-ray-cluster.yaml"][0]
    raycluster = files["raycluster.yaml"][0]
    rayjob = files["rayjob.yaml"][0]
    from jobs.tracking import SECRET_VARS
    from orchestrator.remote import entrypoint

    # the same entrypoint as `rayft submit`, the same runtime_env as the shared file
    assert rayjob["spec"]["entrypoint"].split(" /config/job.yaml ")[0] == entrypoint("X").split(" job.yaml ")[0]
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == runtime_env
    # one image everywhere, and the one Dockerfile builds it
    k8s = [raycluster["spec"], rayjob["spec"]["rayClusterSpec"]]
    containers = [c for spec in k8s for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in group["template"]["spec"]["containers"]]
    images = {c["image"] for c in containers} | {launcher["docker"]["image"]}
    assert len(images) == 1 and "FROM rayproject/ray:2.60.0" in (REPO / "cluster" / "Dockerfile").read_text()
    # token auth on every node, never a literal token
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        # tracking credentials (read by the driver, on the head) come from a Secret too
        assert all("value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"] for name in SECRET_VARS if name in env)
    heads = [spec["headGroupSpec"]["template"]["spec"]["containers"][0] for spec in k8s]
    assert all({"MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY"} <= {e["name"] for e in head["env"]} for head in heads)
    assert not set(SECRET_VARS) & set(runtime_env.get("env_vars") or {})
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:])
    # ports: GCS 6379 and the Jobs API 8265; one GPU per worker, none on the head
    for spec in k8s:
        ports = {p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {6379, 8265}
        worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "--port=6379" in launcher["head_start_ray_commands"][1] and "--dashboard-port=8265" in launcher["head_start_ray_commands"][1]
    assert launcher["available_node_types"]["gpu_workers"]["resources"]["GPU"] == 1
    assert launcher["available_node_types"]["head"]["resources"]["CPU"] == 0


def test_a_uri_run_directory_is_uploaded_whole(tmp_path):
    from jobs.entrypoint import upload

    local = tmp_path / "scratch" / "run-1"
    (local / "model").mkdir(parents=True)
    (local / "model" / "config.json").write_text("{}")
    (local / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (local / "checkpoints" / "checkpoint_1" / "weights.safetensors").write_bytes(b"w" * 1000)
    (local / "manifest.json").write_text('{"ok": true}')
    (local / "job.yaml").write_text("name: run-1\n")
    (local / "model.partial").mkdir()  # a leftover of an interrupted export is not uploaded
    (local / "model.failed").mkdir()  # nor an export that failed its parity check
    (local / "model.failed" / "model.safetensors").write_bytes(b"bad")
    upload(local, f"file://{tmp_path}/bucket/prefix/run-1")
    remote = tmp_path / "bucket" / "prefix" / "run-1"
    assert (remote / "model" / "config.json").read_text() == "{}"
    assert (remote / "checkpoints" / "checkpoint_1" / "weights.safetensors").stat().st_size == 1000
    assert json.loads((remote / "manifest.json").read_text()) == {"ok": True}
    assert not (remote / "model.partial").exists() and not (remote / "model.failed").exists()
    # a driver started again for the URI takes the run back, without the model it will export again
    from jobs.entrypoint import download

    back = tmp_path / "scratch2" / "run-1"
    assert download(f"file://{tmp_path}/bucket/prefix/run-1", back)
    assert (back / "checkpoints" / "checkpoint_1" / "weights.safetensors").stat().st_size == 1000
    assert not (back / "model").exists() and not (back / "manifest.json").exists()
    assert not download(f"file://{tmp_path}/bucket/prefix/run-2", tmp_path / "scratch3")  # nothing there: a new run


HOLD_HEAD = r"""
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = {n["NodeName"]: n for n in ray.nodes() if n["Alive"]}
head = nodes["head"]


@ray.remote(num_cpus=0)
class Holder:
    def ready(self):
        return True


# all of the head's `memory` resource but sys.argv[2] bytes, for as long as this process lives
hold = int(head["Resources"]["memory"]) - int(sys.argv[2])
holder = Holder.options(memory=hold, scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False)).remote()
ray.get(holder.ready.remote())
print(json.dumps({name: {"id": n["NodeID"], "memory": n["Resources"]["memory"]} for name, n in nodes.items()}), flush=True)
sys.stdin.read()
"""


RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": "127.0.0.1:6391"}  # a driver joining the test cluster's GCS


@contextlib.contextmanager
def head_memory_taken(cluster, leave: int = 256 << 20):
    """An actor on the head node reserving all of its `memory` resource but `leave` bytes (less than any export
    needs), for the block's duration; yields node name -> {id, memory}."""
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_HEAD, RAY_ENV["RAY_ADDRESS"], str(leave)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **cluster["env"], **RAY_ENV})
    try:
        line = holder.stdout.readline()
        assert line, holder.stderr.read()[-3000:]
        yield json.loads(line)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def assert_exported_on(run_dir: Path, node: dict) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] and parity["checks"]["end_to_end"]["ran"] and parity["checks"]["end_to_end"]["passed"], parity
    ran_on = parity["ran_on"]
    assert ran_on["node_id"] == node["id"] and ran_on["node_name"] == "node-1" and ran_on["node_ip"] == "127.0.0.1", (ran_on, node)
    assert 256 << 20 < ran_on["memory_requested_bytes"] <= node["memory"]
    assert (run_dir / "model" / "config.json").is_file() and not (run_dir / "model.partial").exists()
    return manifest


def test_export_on_worker_runs_where_the_memory_is_and_lands_in_the_run(cluster, quickstart_run, tmp_path):
    """`export.on: worker` on the two-node cluster (`rayft merge` joining it through RAY_ADDRESS): with the head's
    memory taken, Ray places the export on node-1, and the checked model lands in the run directory."""
    import shutil

    source = Path(quickstart_run["merged_model"]).parent
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("model", "model.*", "manifest.json"))
    job = yaml.safe_load((run_dir / "job.yaml").read_text())
    job["export"] = {**job.get("export", {}), "on": "worker", "parity_memory": "4GiB"}  # reserved with the export
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    with head_memory_taken(cluster) as nodes:
        out = rayft("merge", str(run_dir), "--json", env={**cluster["env"], **RAY_ENV})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert_exported_on(run_dir, nodes["node-1"])


@pytest.mark.slow
def test_a_submitted_job_whose_head_is_small_exports_on_a_worker(cluster, quickstart_run, tmp_path):
    """The issue's case: a job submitted with export.on: worker while the head (where its driver runs) has no
    memory to spare trains, exports on node-1, and its model and manifest land in storage."""
    path = job_file(quickstart_run, tmp_path)
    with head_memory_taken(cluster) as nodes:
        sub = rayft("submit", str(path), "--address", ADDRESS, "--set", "export.on=worker", "--json", env=cluster["env"])
        assert sub.returncode == 0, sub.stderr + sub.stdout
        submitted = json.loads(sub.stdout)
        follow = rayft("logs", submitted["job_id"], "--follow", "--address", ADDRESS, env=cluster["env"], timeout=600)
    assert "rayft: merged model" in follow.stdout, follow.stdout[-3000:]
    assert_exported_on(Path(submitted["results"]), nodes["node-1"])


EXPORT_ON_SMALL_RAY = r"""
import json, shutil, sys, time
from pathlib import Path
import ray
from safetensors.torch import load_file, save_file
from jobs.export_task import ExportPlacementError, export_on_worker, memory_request
from jobs.merge import ParityError
from orchestrator.config import build_job, load_raw
from orchestrator.launch import latest_checkpoint

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
raw = load_raw(run_dir / "job.yaml")
checkpoint = latest_checkpoint(run_dir)
ray.init(address="local", num_cpus=1, _memory=3 << 29, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
said = {}
# 1. more than the only node offers (the end-to-end check reserved on top): refused before Ray sees it
job, _ = build_job({**raw, "export": {"on": "worker", "parity_memory": "4GiB"}})
t0 = time.time()
try:
    export_on_worker(job, checkpoint, out / "model")
except ExportPlacementError as e:
    said["infeasible"] = {"message": str(e), "took": time.time() - t0, "need": memory_request(job, checkpoint)}
# 2. fits: runs as a task, and a failed check comes back as the ParityError it raised there
bad = out / "bad_checkpoint"
shutil.copytree(checkpoint, bad)
weights = load_file(str(bad / "weights.safetensors"))
weights.update({k.replace("layers.0.", "layers.9."): v.clone() for k, v in weights.items() if "layers.0.mlp.up_proj" in k})
save_file(weights, str(bad / "weights.safetensors"))
job, _ = build_job({**raw, "export": {"on": "worker", "parity_memory": "0"}})
try:
    export_on_worker(job, bad, out / "model")
except ParityError as e:
    said["parity"] = {"message": str(e), "type": type(e).__module__ + "." + type(e).__name__}
print(json.dumps(said))
"""


def test_export_on_worker_refuses_what_no_node_holds_and_reraises_a_failed_check(quickstart_run, tmp_path):
    """A real local Ray whose only node offers 1.5 GiB of `memory`. An export that needs more would wait forever
    as infeasible: it is refused at once, naming export.on and both sizes. One that fits runs as a Ray task, and
    its failed check comes back as a ParityError with the task's message, not as Ray's RayTaskError."""
    import sys

    run_dir = Path(quickstart_run["merged_model"]).parent
    proc = subprocess.run([sys.executable, "-c", EXPORT_ON_SMALL_RAY, str(run_dir), str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = json.loads(proc.stdout.strip().splitlines()[-1])
    infeasible = said["infeasible"]
    message = infeasible["message"]
    # the sizing (imports, a meta-device model), never a wait in Ray's queue of infeasible tasks (which is forever)
    assert infeasible["took"] < 180, infeasible
    assert "export.on: worker" in message and f"{infeasible['need'] / 2**30:.1f} GiB" in message and "1.5 GiB" in message, message
    assert "export.parity_memory: 4GiB" in message and "export.on: driver" in message, message
    parity = said["parity"]
    assert parity["type"] == "jobs.merge.ParityError" and "layers.9.mlp.up_proj" in parity["message"], parity
    assert "RayTaskError" not in parity["message"] and "Traceback" not in parity["message"]
    assert not (tmp_path / "model").exists()  # neither the refused export nor the failed one published a model
