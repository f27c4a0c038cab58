"""Tracking (`tracking:`): a real MLflow server (SQLite backend, on loopback, inside the test's network
namespace), W&B in offline mode, and TensorBoard event files, each read back with its own reader."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import wandb_offline
from conftest import RAYFT, REPO

from orchestrator.processes import free_port

pytestmark = pytest.mark.slow

CANARY = {"MLFLOW_TRACKING_TOKEN": "canary-mlflow-3f9a1c", "WANDB_API_KEY": "canary-wandb-7d2e4b"}
SERVER = Path(os.environ.get("RAYFT_MLFLOW_SERVER", REPO / ".venv" / "mlflow-server" / "bin" / "mlflow"))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts; stopped by its PID. It runs
    from its own venv (`make test` builds it): the full mlflow package pins pyarrow<26, rayft's client
    (mlflow-skinny) does not."""
    root = tmp_path_factory.mktemp("mlflow")
    proc, uri = start_server(root)
    yield {"uri": uri, "root": root}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server["uri"])


def quick_job(quickstart_run, tmp_path: Path, server_uri: str | None, *extra: str) -> list[str]:
    """`rayft train` of the quickstart's QLoRA job, 16 steps, with tracking settings."""
    job_file = Path(quickstart_run["root"]) / "jobs" / "qlora.yaml"
    sets = {"output": str(tmp_path / "runs"), "train.max_steps": 16, "train.eval_every": 8, "train.checkpoint_every": 8, "train.log_every": 2,
            "eval.at_start": False}
    if server_uri:
        sets |= {"tracking.mlflow.tracking_uri": server_uri, "tracking.mlflow.experiment": tmp_path.name}
    args = [RAYFT, "train", str(job_file), "--no-progress", "--json"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    for e in extra:
        args += ["--set", e]
    return args


def run_dir_of(tmp_path: Path) -> Path:
    (found,) = [d for d in (tmp_path / "runs").iterdir() if (d / "job.yaml").is_file()]
    return found


def same_series(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, in order; values equal to float32 precision (TensorBoard stores float32)."""
    return [s for s, _ in got] == [s for s, _ in expected] and [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def reported(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("event") in ("train", "eval")]


def test_a_run_is_tracked_in_mlflow_wandb_and_tensorboard_without_leaking_credentials(quickstart_run, mlflow_server, tmp_path):
    env = {**os.environ, **CANARY}
    args = quick_job(quickstart_run, tmp_path, mlflow_server["uri"], "tracking.mlflow.log_model=true",
                     "tracking.wandb.project=rayft-tests", "tracking.wandb.mode=offline",
                     "eval.generate.samples=4", "eval.generate.max_new_tokens=4", "eval.at_start=true")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    run_dir = run_dir_of(tmp_path)
    records = reported(run_dir)
    state = json.loads((run_dir / "tracking.json").read_text())
    assert "warnings" not in state, state

    # MLflow: the resolved config as params, every metric at its step once, the files, the model
    c = client(mlflow_server)
    run = c.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert c.get_experiment(run.info.experiment_id).name == tmp_path.name
    params = run.data.params
    assert params["method"] == "qlora" and params["lora.rank"] == "16" and params["quantization.type"] == "nf4"
    assert params["train.max_steps"] == "16" and params["tracking.mlflow.log_model"] == "true"
    for key in ("train_loss", "lr", "tokens_per_s", "eval_accuracy", "eval_loss", "eval_generated_accuracy"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        got = [(m.step, m.value) for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        assert same_series(got, expected), (key, got, expected)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 8, 16]
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "job.yaml", "metrics.jsonl", "model"} <= artifacts, artifacts
    assert "config.json" in {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "model")}
    # eval.generate's answers as a table: the trained model's at each eval (0, 8, 16), then the merged model's
    table = json.loads(Path(c.download_artifacts(run.info.run_id, "generations.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["step"], r["model"]) for r in rows] == [(s, "trained") for s in (0, 8, 16) for _ in range(4)] + [(16, "merged")] * 4
    assert {"prompt", "expected", "generated", "correct"} <= set(rows[0])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert run.data.metrics["merged_accuracy"] == pytest.approx(manifest["parity"]["merged_accuracy"])

    # TensorBoard: read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    losses = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    assert same_series([(e.step, e.value) for e in events.Scalars("train_loss")], losses)
    assert [e.step for e in events.Scalars("eval_accuracy")] == [0, 8, 16]

    # W&B offline: the run file's history and config, and the files artifact
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_offline.history(wandb_file)
    assert same_series([(h["_step"], h["train_loss"]) for h in history if "train_loss" in h], losses)
    assert wandb_offline.config(wandb_file)["lora.rank"] == "16"
    assert any(name.startswith("run-") for name in wandb_offline.artifacts(wandb_file))
    (table_file,) = wandb_file.parent.glob("files/media/table/generations_*.table.json")  # the W&B Table
    assert len(json.loads(table_file.read_text())["data"]) == len(rows)

    # the credentials reach no file of the run, the server's store or artifacts, and no output
    for where in (run_dir, mlflow_server["root"]):
        for f in (p for p in where.rglob("*") if p.is_file()):
            data = f.read_bytes()
            assert not any(v.encode() in data for v in CANARY.values()), f
    assert not any(v in proc.stdout + proc.stderr for v in CANARY.values())


def test_a_resumed_run_continues_its_mlflow_run_without_logging_a_step_twice(quickstart_run, mlflow_server, tmp_path):
    """A run that fails after step 11 (its checkpoint is of step 8), then `--resume`: the same MLflow run,
    marked FAILED in between; steps 9-11, run again by the second attempt, logged once."""
    args = quick_job(quickstart_run, tmp_path, mlflow_server["uri"])
    first = subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, "RAYFT_FAULT_AT_STEP": "11"})
    assert first.returncode == 1, first.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    c = client(mlflow_server)
    assert c.get_run(run_id).info.status == "FAILED"
    assert max(m.step for m in c.get_metric_history(run_id, "train_loss")) == 10

    second = subprocess.run([*args, "--resume", str(run_dir)], capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    assert len(c.search_runs([c.get_run(run_id).info.experiment_id])) == 1
    records = reported(run_dir)
    assert len([r for r in records if r["step"] == 10]) == 2  # the second attempt ran step 10 again
    history = c.get_metric_history(run_id, "train_loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(2, 17, 2)), steps  # every step once
    first_value = {r["step"]: r["train_loss"] for r in reversed(records) if "train_loss" in r}  # the first attempt's value
    assert same_series(sorted((m.step, m.value) for m in history), sorted(first_value.items()))
    assert c.get_run(run_id).info.status == "FINISHED"


def test_a_tracking_server_that_is_down_warns_once_and_the_run_goes_on(quickstart_run, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = quick_job(quickstart_run, tmp_path, uri, "train.max_steps=4", "train.eval_every=4")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert said.count(f"tracking.mlflow: open failed at {uri}") == 1, said[-3000:]
    assert "training goes on" in said
    run_dir = run_dir_of(tmp_path)
    assert (run_dir / "model" / "config.json").is_file()
    assert json.loads((run_dir / "tracking.json").read_text())["warnings"]


def test_validate_checks_the_tracking_uri_and_submit_refuses_to_carry_secrets(quickstart_run, tmp_path):
    job_file = Path(quickstart_run["root"]) / "jobs" / "qlora.yaml"
    cases = {
        "http://alice:s3cret@mlflow.internal:5000": "MLFLOW_TRACKING_USERNAME",
        "mlflow.internal:5000": "is not an MLflow tracking URI",
        "http://mlflow.internal:50x0": "the port is not a number",
    }
    for uri, said in cases.items():
        proc = subprocess.run([RAYFT, "validate", str(job_file), "--set", f"tracking.mlflow.tracking_uri={uri}"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "tracking.mlflow.tracking_uri" in proc.stderr + proc.stdout and said in proc.stderr + proc.stdout, proc.stderr
        assert "s3cret" not in proc.stdout + proc.stderr

    from orchestrator import remote
    from orchestrator.config import load_job

    job, _ = load_job(job_file, ["tracking.mlflow.tracking_uri=http://mlflow.internal:5000", "submit.ship=[]"], local_files=False)
    with pytest.raises(remote.RemoteError, match="MLFLOW_TRACKING_TOKEN.*cluster's own environment"):
        remote.submit(job, "http://127.0.0.1:1", None, {"env_vars": {"MLFLOW_TRACKING_TOKEN": "x"}})
    package = remote.build_package(job, "test")
    try:
        shipped = (package.directory / "job.yaml").read_text()
    finally:
        shutil.rmtree(package.directory, ignore_errors=True)
    assert "tracking_uri: http://mlflow.internal:5000" in shipped


def test_a_search_is_one_parent_run_with_a_child_run_per_trial(quickstart_run, mlflow_server, tmp_path):
    """Two trials of two workers each, one failing (every row longer than its max_length): the failing trial is
    recorded as failed with the reason, the other still wins and is exported; in MLflow the parent holds the
    results and the best trial, each child its trial's config, overrides and status. (Trials of several workers
    run as a TorchTrainer each: the one search of the suite that does; test_tune's run in their own actors.)"""
    import yaml
    from test_tune import search_file

    path = search_file(quickstart_run, tmp_path, num_samples=1, scheduler="fifo", space={"data.max_length": {"grid": [64, 20]}})
    body = yaml.safe_load(path.read_text())
    body["train"]["max_steps"] = 8
    body["scaling"] = {"workers": 2, "cpus_per_worker": 1}
    body["tracking"] = {"mlflow": {"tracking_uri": mlflow_server["uri"], "experiment": tmp_path.name}}
    path.write_text(yaml.safe_dump(body))
    proc = subprocess.run([RAYFT, "tune", str(path), "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    by_length = {t["overrides"]["data.max_length"]: t for t in summary["trials"]}
    assert by_length[20]["status"] == "failed" and "longer than data.max_length=20" in by_length[20]["reason"]
    assert by_length[64]["status"] == "finished" and summary["best"]["trial"] == by_length[64]["trial"]
    search_dir = Path(summary["best_model"]).parents[1]
    assert "failed: " in (search_dir / "results.md").read_text()
    start = next(json.loads(x) for x in (search_dir / "trials" / by_length[64]["trial"] / "metrics.jsonl").read_text().splitlines() if '"event": "start"' in x)
    assert start["runner"] == "ray_train" and start["world_size"] == 2
    c = client(mlflow_server)
    (experiment,) = [e for e in c.search_experiments() if e.name == tmp_path.name]
    runs = c.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["data.max_length"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 3 and set(children) == {"64", "20"}
    assert children["64"].data.tags["rayft.status"] == "finished" and children["64"].info.status == "FINISHED"
    assert children["20"].data.tags["rayft.status"] == "failed" and children["20"].info.status == "FAILED"
    assert "longer than data.max_length=20" in children["20"].data.tags["rayft.reason"]
    assert json.loads(children["64"].data.tags["rayft.overrides"]) == {"data.max_length": 64}
    assert children["64"].data.metrics["eval_accuracy"] == pytest.approx(summary["best"]["best_metric"])
    assert parent.info.status == "FINISHED" and parent.data.tags["rayft.best_trial"] == summary["best"]["trial"]
    assert parent.data.params["tune.metric"] == '"eval_accuracy"'
    assert parent.data.metrics["best_eval_accuracy"] == pytest.approx(summary["best"]["best_metric"])
    assert {"results.md", "results.csv", "manifest.json"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_with_no_tracker_installed_validate_says_what_to_install_and_tensorboard_still_logs(quickstart_run, tmp_path):
    """mlflow, wandb and tensorboard made unimportable: validate names the extra to install, and the
    default tracking (TensorBoard events, written with ray[tune]'s tensorboardX) still works."""
    job_file = Path(quickstart_run["root"]) / "jobs" / "qlora.yaml"
    code = f"""
import sys, json
for m in ("mlflow", "wandb", "tensorboard"):
    sys.modules[m] = None
from pathlib import Path
from orchestrator.config import ConfigError, load_job
try:
    load_job({str(job_file)!r}, ["tracking.mlflow.tracking_uri=http://127.0.0.1:5000", "tracking.wandb.project=p"])
except ConfigError as e:
    print(json.dumps([str(p) for p in e.problems]))
from jobs.tracking import Tracker
job, _ = load_job({str(job_file)!r})
run_dir = Path({str(tmp_path)!r})
(run_dir / "metrics.jsonl").write_text("\\n".join(json.dumps(r) for r in [
    {{"event": "start", "step": 0}}, {{"event": "train", "step": 2, "train_loss": 1.5, "time": 1.0}},
    {{"event": "eval", "step": 4, "train_loss": 1.0, "eval_accuracy": 0.5, "time": 2.0}}]) + "\\n")
tracker = Tracker(job, run_dir, sys.stdout).start(wait=True)
tracker.finish()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems = json.loads(proc.stdout.strip().splitlines()[0])
    assert any("tracking.mlflow" in p and "pip install 'rayft[mlflow]'" in p for p in problems), problems
    assert any("tracking.wandb" in p and "pip install 'rayft[wandb]'" in p for p in problems), problems
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(2, 1.5), (4, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval_accuracy")] == [(4, 0.5)]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    assert SERVER.is_file(), f"{SERVER} missing: `make test` builds it (or set RAYFT_MLFLOW_SERVER)"
    port = free_port()
    proc = subprocess.Popen(
        [str(SERVER), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)


def write_records(run_dir: Path, steps: range) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        for s in steps:
            f.write(json.dumps({"event": "train", "step": s, "train_loss": 1.0 / s, "time": 1000.0 + s}) + "\n")


def test_a_server_lost_mid_run_warns_once_and_logging_stops_there(tmp_path):
    """The Tracker as the driver runs it: steps 1-3 reach MLflow; the server dies; the next calls fail, one
    warning names the URI, a second says the tracker is left alone after 3 failures in a row, and it is not
    called again (TensorBoard goes on)."""
    import io

    from jobs.tracking import Tracker
    from orchestrator.config import JobConfig

    (tmp_path / "srv").mkdir()
    server, uri = start_server(tmp_path / "srv")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = JobConfig.model_validate({"model": "m", "data": {"train": "t.parquet"}, "tracking": {"mlflow": {"tracking_uri": uri}}})
    out = io.StringIO()
    tracker = Tracker(job, run_dir, out).start(wait=True)
    try:
        write_records(run_dir, range(1, 4))
        assert tracker.forward() == 3
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        last = 3
        while "mlflow" in [s.name for s in tracker._live()] and last < 30:  # each failed flush counts (one per forward that logs)
            last += 1
            write_records(run_dir, range(last, last + 1))
            tracker.forward()
        assert [s.name for s in tracker._live()] == ["tensorboard"]  # MLflow given up on: no more calls, no retries
        write_records(run_dir, range(last + 1, last + 2))
        tracker.forward()
    finally:
        tracker.finish()
    said = out.getvalue()
    assert said.count(f"tracking.mlflow: flush failed at {uri}") == 1, said
    assert said.count("3 calls to") == 1 and "not logging there for the rest of this run" in said
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, last + 2))


def test_the_end_of_a_search_tags_every_trial_status(mlflow_server, tmp_path):
    """finish_search on a search directory whose trials finished, stopped early, failed or were skipped:
    one child per trial under the parent, each tagged with its status and ended accordingly."""
    from jobs.tracking import Tracker, finish_search
    from orchestrator.config import JobConfig, to_yaml

    tracking = {"mlflow": {"tracking_uri": mlflow_server["uri"], "experiment": tmp_path.name}}
    job = JobConfig.model_validate({"model": "m", "data": {"train": "t.parquet"}, "tracking": tracking})
    search_dir = tmp_path / "search"
    statuses = {"t_finished": ("finished", None), "t_stopped": ("stopped early", None), "t_failed": ("failed", "boom"),
                "t_skipped": ("skipped", "needs 80 GiB")}
    for name in statuses:
        (search_dir / "trials" / name).mkdir(parents=True)
        (search_dir / "trials" / name / "job.yaml").write_text(to_yaml(job))
    parent = Tracker(job, search_dir, sys.stdout, kinds=("mlflow",)).start(wait=True)
    (search_dir / "results.md").write_text("| trial |\n")
    summary = {"metric": "eval_accuracy", "best": {"trial": "t_finished", "best_metric": 0.9},
               "trials": [{"trial": n, "status": s, "reason": r, "overrides": {"lora.rank": i}} for i, (n, (s, r)) in enumerate(statuses.items())]}
    finish_search(search_dir, summary, parent, [search_dir / "results.md"], None, sys.stdout)
    c = client(mlflow_server)
    (experiment,) = [e for e in c.search_experiments() if e.name == tmp_path.name]
    runs = {r.info.run_name: r for r in c.search_runs([experiment.experiment_id])}
    assert runs["search"].info.status == "FINISHED" and runs["search"].data.tags["rayft.best_trial"] == "t_finished"
    assert runs["search"].data.metrics["best_eval_accuracy"] == 0.9
    expected = {"t_finished": "FINISHED", "t_stopped": "KILLED", "t_failed": "FAILED", "t_skipped": "KILLED"}
    for name, status in expected.items():
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == runs["search"].info.run_id
        assert child.data.tags["rayft.status"] == statuses[name][0] and child.info.status == status
        assert child.data.tags.get("rayft.reason") == statuses[name][1]
