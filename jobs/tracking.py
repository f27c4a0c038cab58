"""Tracking: what a run reports, forwarded to TensorBoard, MLflow and Weights & Biases (`tracking:`).

One process per run forwards: the run's driver (`rayft train`, a cluster job's entrypoint, a Tune trial's
actor). It tails RUN_DIR/metrics.jsonl, which rank 0 alone writes, so every metric is logged once whatever
the number of workers, and training never waits on a tracker. RUN_DIR/tracking.json keeps the MLflow run id,
the W&B id and the last step forwarded: a restart of the workers or a `--resume` continues the same runs, and
steps an attempt runs again after a lost worker (already logged by the attempt before) are not logged twice.

A tracker that is down or refuses warns once (naming it) and the run goes on; after MAX_FAILURES calls in a
row fail it is left alone for the rest of the process. Credentials come from the environment only (MLflow and
wandb read MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD and WANDB_API_KEY themselves); nothing here writes
them, and a warning has any such value masked.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from jobs.metrics_log import metrics_path
from orchestrator.config import JobConfig, MlflowConfig, WandbConfig, load_raw
from orchestrator.dotted import flatten

STATE = "tracking.json"
TB_DIR = "tb"
MAX_FAILURES = 3
POLL_S = 1.0
SECRET_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# what each MLflow REST call may cost when the server is down: 2 retries 1 s and 2 s apart, 10 s per request
MLFLOW_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
NOT_METRICS = {"step", "attempt", "time", "eval_step"}
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def masked(text: str) -> str:
    """text with the value of every credential variable replaced by ***."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (STATE + ".tmp")
    try:
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(run_dir / STATE)
    except FileNotFoundError:  # the run directory was removed (bad data before training)
        pass


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The numbers a train or eval record reports (not its step, attempt or time)."""
    if record.get("event") not in ("train", "eval"):
        return {}
    return {
        k: float(v) for k, v in record.items()
        if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def run_params(job: JobConfig) -> dict[str, str]:
    """The resolved config as flat params (`lora.rank` -> "16"), MLflow's length limits applied."""
    out = {}
    for key, value in flatten(job.model_dump(mode="json", exclude={"tune"})).items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key[:250]] = text[:6000]
    return out


@dataclass
class Ending:
    """How a tracked run ends: its status (finished | failed | killed), files to keep as artifacts, the model
    directory (uploaded where log_model is on), final numbers, tags, and tables (name -> column -> values)."""

    status: str = "finished"
    files: list[Path] = field(default_factory=list)
    model_dir: Path | None = None
    summary: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


# ---- one class per tracker: open (create or continue the run), log, finish -------------------------------


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        self.where = str(run_dir / TB_DIR)
        self.writer: Any = None

    def open(self, state: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter  # a dependency of ray[tune]: always there

        self.writer = SummaryWriter(self.where, flush_secs=5)

    def log(self, step: int, metrics: dict[str, float], wall: float) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, end: Ending) -> None:
        self.writer.close()


class Mlflow:
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, run_dir: Path, params: dict[str, str], run_name: str, tags: dict[str, str], parent: str | None):
        self.cfg, self.run_dir, self.params, self.run_name, self.tags, self.parent = cfg, run_dir, params, run_name, tags, parent
        self.where = cfg.tracking_uri
        self.client: Any = None
        self.run_id: str | None = None
        self.pending: list[Any] = []

    def open(self, state: dict[str, Any]) -> None:
        for key, value in MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(self.cfg.tracking_uri)
        mine = state.setdefault("mlflow", {})
        if mine.get("run_id") and mine.get("tracking_uri") == self.cfg.tracking_uri:
            self.run_id = mine["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")  # continued: a restart or --resume
            return
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.cfg.experiment)
        tags = {**self.tags, **({"mlflow.parentRunId": self.parent} if self.parent else {})}
        run = self.client.create_run(experiment_id, run_name=self.cfg.run_name or self.run_name, tags=tags)
        self.run_id = run.info.run_id
        items = list(self.params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        mine.update(run_id=self.run_id, experiment_id=experiment_id, tracking_uri=self.cfg.tracking_uri)

    def log(self, step: int, metrics: dict[str, float], wall: float) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(k, v, int(wall * 1000), step) for k, v in metrics.items()]

    def flush(self) -> None:
        while self.pending:  # at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[:1000])
            del self.pending[:1000]

    def finish(self, end: Ending) -> None:
        from mlflow.entities import Metric, RunTag

        if end.tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v[:5000]) for k, v in end.tags.items()])
        if end.summary:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in end.summary.items()])
        for name, columns in end.tables.items():  # the UI shows these as tables (artifact <name>.json)
            self.client.log_table(self.run_id, data=columns, artifact_file=f"{name}.json")
        for f in end.files:
            if f.is_file():
                self.client.log_artifact(self.run_id, str(f))
        if end.model_dir is not None and self.cfg.log_model and end.model_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(end.model_dir), "model")
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(end.status, "FINISHED"))


class Wandb:
    name = "wandb"

    def __init__(self, cfg: WandbConfig, run_dir: Path, params: dict[str, str], run_name: str, group: str | None):
        self.cfg, self.run_dir, self.params, self.run_name, self.group = cfg, run_dir, params, run_name, group
        self.where = f"wandb project {cfg.project} ({cfg.mode})"
        self.run: Any = None

    def open(self, state: dict[str, Any]) -> None:
        import wandb

        mine = state.setdefault("wandb", {})
        mine.setdefault("id", secrets.token_hex(4))  # W&B ids: up to 64 of [a-z0-9_-]
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, mode=self.cfg.mode, dir=str(self.run_dir), id=mine["id"],
            resume="allow", name=self.run_name, group=self.group, config=self.params, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True, disable_code=True),
        )

    def log(self, step: int, metrics: dict[str, float], wall: float) -> None:
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        pass

    def finish(self, end: Ending) -> None:
        import wandb

        self.run.summary.update({**end.summary, **end.tags})
        for name, columns in end.tables.items():
            keys = list(columns)
            self.run.log({name: wandb.Table(columns=keys, data=[list(row) for row in zip(*columns.values(), strict=True)])})
        existing = [f for f in end.files if f.is_file()]
        if existing:
            art = wandb.Artifact(f"run-{self.run.id}-files", type="run-files")
            for f in existing:
                art.add_file(str(f))
            self.run.log_artifact(art)
        if end.model_dir is not None and self.cfg.log_model and end.model_dir.is_dir():
            art = wandb.Artifact(f"model-{self.run.id}", type="model")
            art.add_dir(str(end.model_dir))
            self.run.log_artifact(art)
        self.run.finish(exit_code=0 if end.status == "finished" else 1)


# ---- the forwarder ---------------------------------------------------------------------------------------


class Tracker:
    """Forwards RUN_DIR/metrics.jsonl to the job's trackers from a thread: start() before training, stop()
    after it (logs what is left), finish() once the run's files are written. parent: the MLflow run id of
    the search a trial belongs to; group: the W&B group (the search's name)."""

    def __init__(self, job: JobConfig, run_dir: Path, stream: IO[str], *, parent: str | None = None, group: str | None = None,
                 tags: dict[str, str] | None = None, run_name: str | None = None, params: dict[str, str] | None = None,
                 kinds: tuple[str, ...] = ("tensorboard", "mlflow", "wandb")):
        self.run_dir, self.stream = run_dir, stream
        params = {**run_params(job), **(params or {})}
        name = run_name or run_dir.name
        tags = {"rayft.run_dir": str(run_dir), "rayft.method": job.method, **(tags or {})}
        t = job.tracking
        self.sinks: list[Any] = [
            *([TensorBoard(run_dir)] if t.tensorboard and "tensorboard" in kinds else []),
            *([Mlflow(t.mlflow, run_dir, params, name, tags, parent)] if t.mlflow and "mlflow" in kinds else []),
            *([Wandb(t.wandb, run_dir, params, name, group)] if t.wandb and "wandb" in kinds else []),
        ]
        self.failures: dict[str, int] = {}
        self.warned: set[str] = set()
        self.state: dict[str, Any] = {}
        self._offset = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._opened = False

    @property
    def mlflow_run_id(self) -> str | None:
        return next((s.run_id for s in self.sinks if isinstance(s, Mlflow)), None)

    def start(self, wait: bool = False) -> Tracker:
        """Open the trackers (in the thread, so importing a client and creating its run overlap Ray's start;
        wait: here, before returning) and start tailing."""
        if not self.sinks:
            return self
        self.state = read_state(self.run_dir)
        self.state.setdefault("logged_step", -1)
        if wait:
            self._open()
        self._thread = threading.Thread(target=self._run, args=(not wait,), name="rayft-tracking", daemon=True)
        self._thread.start()
        return self

    def _open(self) -> None:
        with self._lock:
            t0 = time.time()
            for sink in list(self.sinks):
                if not self._call(sink, "open", lambda s=sink: s.open(self.state)):
                    self.sinks.remove(sink)  # never opened: nothing to log into
            self.state.setdefault("cost", {"cpu_s": 0.0, "wall_s": 0.0})["open_s"] = round(time.time() - t0, 3)
            write_state(self.run_dir, self.state)
            self._opened = True

    def stop(self) -> None:
        """Stop tailing; forward what metrics.jsonl holds now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            self._thread = None
        if self._opened:
            self.forward()

    def finish(self, status: str = "finished", files: tuple[Path, ...] | list[Path] = (), model_dir: Path | None = None,
               summary: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
               tables: dict[str, dict[str, list[Any]]] | None = None) -> None:
        """status: finished | failed | killed. files: logged as artifacts; model_dir: as well where a tracker's
        log_model is on; summary: final numbers (e.g. the merged model's accuracy); tags: MLflow tags;
        tables: name -> column -> values (MLflow tables, W&B Tables)."""
        self.stop()
        if not self._opened:
            return
        clean = {k: float(v) for k, v in (summary or {}).items() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        end = Ending(status, list(files), model_dir, clean, {k: masked(v) for k, v in (tags or {}).items()}, tables or {})
        t0 = time.time()
        for sink in self._live():
            self._call(sink, "finish", partial(sink.finish, end))
        self.sinks = []
        self.state.setdefault("cost", {"cpu_s": 0.0, "wall_s": 0.0})["finish_s"] = round(time.time() - t0, 3)
        write_state(self.run_dir, self.state)

    def forward(self) -> int:
        """Log the records metrics.jsonl gained since the last call; returns how many steps were logged. What
        forwarding costs this process is kept in tracking.json (cost: CPU and wall seconds, records)."""
        cpu, wall = time.thread_time(), time.time()
        try:
            return self._forward()
        finally:
            cost = self.state.setdefault("cost", {"cpu_s": 0.0, "wall_s": 0.0})
            cost["cpu_s"] = round(cost["cpu_s"] + time.thread_time() - cpu, 4)
            cost["wall_s"] = round(cost["wall_s"] + time.time() - wall, 4)

    def _forward(self) -> int:
        with self._lock:
            path = metrics_path(self.run_dir)
            if not path.is_file() or not self._live():
                return 0
            with path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only: rank 0 may be writing the next one
            self._offset += end
            logged = 0
            for line in chunk[:end].splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                metrics, step = metrics_of(record), record.get("step")
                if not metrics or not isinstance(step, int) or step <= self.state["logged_step"]:
                    continue  # an event, or a step an earlier attempt logged
                wall = float(record.get("time") or time.time())
                for sink in self._live():
                    self._call(sink, "log", partial(sink.log, step, metrics, wall), counts=False)
                self.state["logged_step"] = step
                logged += 1
            if logged:
                for sink in self._live():
                    self._call(sink, "flush", sink.flush)
                write_state(self.run_dir, self.state)
            return logged

    def _live(self) -> list[Any]:
        return [s for s in self.sinks if self.failures.get(s.name, 0) < MAX_FAILURES]

    def _run(self, open_first: bool) -> None:
        if open_first:
            self._open()
        while not self._stop.wait(POLL_S):
            self.forward()

    def _call(self, sink: Any, what: str, fn: Callable[[], Any], counts: bool = True) -> bool:
        """fn(), a tracker's failure warned about (once) and counted; counts: a success ends a run of failures
        (not for log(), which only queues: the flush that follows is what reaches the tracker)."""
        try:
            fn()
        except Exception as e:  # a tracker never fails the run
            self.failures[sink.name] = self.failures.get(sink.name, 0) + (MAX_FAILURES if what == "open" else 1)
            if sink.name not in self.warned:
                self.warned.add(sink.name)
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self._warn(f"warning: tracking.{sink.name}: {what} failed at {sink.where}: {type(e).__name__}: {first}; training goes on")
            elif self.failures[sink.name] >= MAX_FAILURES and f"{sink.name}:off" not in self.warned:
                self.warned.add(f"{sink.name}:off")
                self._warn(f"warning: tracking.{sink.name}: {MAX_FAILURES} calls to {sink.where} failed in a row; not logging there for the rest of this run")
            return False
        if counts:
            self.failures[sink.name] = 0
        return True

    def _warn(self, text: str) -> None:
        text = masked(text)
        self.state.setdefault("warnings", []).append(text)
        try:
            print(text, file=self.stream, flush=True)
        except (ValueError, OSError):  # the stream was closed: the warning is in tracking.json
            pass


def finish_search(search_dir: Path, summary: dict[str, Any], parent: Tracker, files: list[Path], model_dir: Path | None,
                  stream: IO[str]) -> None:
    """A search's end in MLflow: every trial's child run continued (what its trial's process had not forwarded
    yet, e.g. one ASHA stopped), tagged with its status (finished / stopped early / failed / skipped) and
    reason, and ended; then the parent, with the results and the best trial."""
    parent_id = parent.mlflow_run_id
    if parent_id:
        ended = {"finished": "finished", "failed": "failed"}  # stopped early and skipped: KILLED
        for t in summary["trials"]:
            trial_dir = search_dir / "trials" / t["trial"]
            if not (trial_dir / "job.yaml").is_file():
                continue
            trial_job = JobConfig.model_validate(load_raw(trial_dir / "job.yaml"))
            child = Tracker(trial_job, trial_dir, stream, parent=parent_id, run_name=t["trial"], kinds=("mlflow",),
                            tags={"rayft.overrides": json.dumps(t["overrides"])})
            child.start(wait=True)
            tags = {"rayft.status": t["status"], **({"rayft.reason": str(t["reason"])} if t.get("reason") else {})}
            child.finish(ended.get(t["status"], "killed"), tags=tags)
    best = summary.get("best") or {}
    final = {f"best_{summary['metric']}": best.get("best_metric")}
    parent.finish("finished", files, model_dir, final, tags={"rayft.best_trial": best["trial"]} if best else None)
