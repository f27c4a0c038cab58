"""The job schema: one typed, frozen object; every default lives here, each field has a one-line doc.

`load_job` is the edge: YAML + `--set` overrides -> schema -> cross-field and filesystem checks, with
every problem collected and raised at once as a ConfigError. Workers rebuild the same object from
`job.model_dump()` with `JobConfig.model_validate`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from orchestrator import dotted

Method = Literal["full", "lora", "qlora"]
Precision = Literal["bf16", "fp16", "fp32"]
QuantType = Literal["nf4", "fp4", "none"]
DATA_SUFFIXES = (".parquet", ".jsonl")


def parse_duration(text: str) -> float:
    """`2h`, `90m`, `1h30m`, `45s` -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", text)
    if not m or not any(m.groups()):
        raise ValueError(f"{text!r}: give a duration such as 2h, 90m, 1h30m or 45s")
    h, mins, secs = (float(g or 0) for g in m.groups())
    return h * 3600 + mins * 60 + secs


def parse_size(text: str) -> int:
    """`24GiB`, `80GB`, `512MiB` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r}: give a size with a unit, e.g. 24GiB, 80GB, 512MiB")
    unit = m.group(2).upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    train: str
    """Training rows: a .parquet or .jsonl file (relative paths resolve against the job file)."""
    eval: str | None = None
    """Held-out rows for eval loss and answer accuracy (same layout as train)."""
    image: str = "image"
    """Column holding each row's image (or a list of images): encoded bytes, a path relative to the data file,
    or Hugging Face datasets' {bytes, path}; a null cell makes a text row. Optional with data.messages."""
    images: str | None = None
    """Column holding each row's list of images (same cell kinds as data.image), one per {"type": "image"}
    part of its messages, in order; used instead of data.image."""
    prompt: str = "question"
    """Column holding the user's question."""
    answer: str = "answer"
    """Column holding the expected answer (loss is computed on these tokens only)."""
    messages: str | None = None
    """Column of chat messages ([{role, content}, ...], role system | user | assistant) used instead of
    prompt/answer; content is a string or a list of {type: text|image} parts; the last message must be the
    assistant's. Images come from the parts, data.images or data.image (before the first user text)."""
    train_on: Literal["all_turns", "last_turn"] = "all_turns"
    """Which assistant messages of a multi-turn row carry the loss: every one, or the last only."""
    max_length: int = Field(256, ge=8)
    """Longest tokenized example, image tokens included; longer rows are never truncated."""
    too_long: Literal["error", "drop"] = "error"
    """What to do with a row longer than max_length: fail naming the row, or drop and count it."""
    blind: bool = False
    """Replace every image by a uniform grey one (a control run: accuracy should stay at chance if the task needs the image)."""
    batching: Literal["rows", "length_grouped", "tokens"] = "rows"
    """How rows form micro batches: rows (train.micro_batch_size rows in shuffled order), length_grouped
    (the same rows per batch, batched with rows of similar length: less padding), or tokens (as many rows
    as fit data.batch_tokens padded tokens per worker)."""
    encode_once: Literal["auto", "off"] = "auto"
    """auto: before training, a Ray Data pass encodes every row once and keeps the tensors beside the row
    store, for every epoch, resume and search trial, when they fit a quarter of the machine's memory and
    half the free disk; otherwise, or with off, Ray Data encodes rows as they stream to the workers."""
    batch_tokens: int | None = Field(None, ge=8)
    """With batching: tokens, the padded tokens (rows x longest row) of one worker's micro batch; at least data.max_length."""


class LoraConfig(_Section):
    rank: int = Field(16, ge=1, le=1024)
    """Rank r of the adapter matrices A (r x in) and B (out x r)."""
    alpha: float = Field(32.0, gt=0)
    """Scaling numerator: the update is (alpha / rank) * B @ A."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    targets: Literal["auto"] | list[str] = "auto"
    """Modules to adapt: `auto` = the language model's attention and MLP projections for the architecture,
    or a list of module-name suffixes."""
    train_vision: bool = False
    """Also adapt the vision tower's projections (with targets: auto)."""


class QuantizationConfig(_Section):
    type: QuantType = "nf4"
    """How the frozen base is stored: nf4 | fp4 (4-bit, qlora only) | none. Defaults to none unless method is qlora."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (about 4.127 instead of 4.5 bits per parameter)."""


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    """Passes over the training rows."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps, whatever epochs says."""
    micro_batch_size: int = Field(8, ge=1)
    """Rows per worker per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro batches accumulated into one optimizer step."""
    lr: float = Field(2.0e-4, gt=0.0, le=1.0)
    """Peak learning rate (AdamW)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of the steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip the gradient norm to this (null: no clipping)."""
    eval_every: int = Field(50, ge=1)
    """Evaluate (and report) every this many optimizer steps, and at the end."""
    checkpoint_every: int = Field(100, ge=1)
    """Checkpoint every this many optimizer steps, and at the end."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many checkpoints Ray keeps (the newest)."""
    log_every: int = Field(10, ge=1)
    """Write a train-loss line to metrics.jsonl every this many optimizer steps."""
    seed: int = 0
    """Seed for weights of new modules, data order and dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""


class DeepSpeedConfig(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 + gradients, 3 + parameters."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state (and its step) in host memory (DeepSpeedCPUAdam)."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in host memory between uses (stage 3 only)."""
    overrides: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged over the generated config (dotted keys allowed: zero_optimization.reduce_bucket_size);
    what they change is recorded in the run directory's deepspeed.json."""


class ScalingConfig(_Section):
    workers: int = Field(1, ge=1)
    """Ray Train workers (data parallel); one GPU each when GPUs are used."""
    gpu: Literal["auto", "on", "off"] = "auto"
    """Use GPUs: auto = when the machine has one; on = require one; off = train on CPU."""
    cpus_per_worker: int | None = Field(None, ge=1)
    """CPU cores reserved per worker (torch threads follow it); null = the machine's cores split among workers."""
    placement: Literal["pack", "spread"] = "pack"
    """Put workers on as few Ray nodes as possible (pack) or on different nodes (spread)."""
    max_failures: int = Field(2, ge=-1)
    """Times Ray Train restarts the workers from the latest checkpoint after a worker is lost (killed, out of
    memory, its node gone); -1 = without limit, 0 = never. An error that would repeat (a NaN loss, a bad row)
    is not retried. Node preemptions Ray announces (spot reclaim, drain) are retried without limit."""
    stop_grace_s: float = Field(120.0, gt=0)
    """On SIGTERM or Ctrl-C: how long the workers get to finish their step and write a checkpoint before
    they are stopped anyway (set a pod's terminationGracePeriodSeconds above it)."""


class Dimension(_Section):
    """One searched key: exactly one of choice, uniform, loguniform, grid."""

    choice: list[Any] | None = None
    """Values to pick from: random and optuna sample among them; search: grid takes each once."""
    uniform: tuple[float, float] | None = None
    """[low, high]: a number drawn uniformly between the bounds (random and optuna; not search: grid)."""
    loguniform: tuple[float, float] | None = None
    """[low, high], both above 0: a number drawn uniformly in log space, e.g. a learning rate (random and optuna)."""
    grid: list[Any] | None = None
    """Values each run once: every combination with the other grid (and, for search: grid, choice) keys; not with optuna."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, grid (got {given or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError("bounds must be [low, high] with low < high")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    def values_to_check(self) -> list[Any]:
        """Values that must each make a valid job (every choice/grid value, both bounds)."""
        return list(self.choice or self.grid or self.uniform or self.loguniform or [])


class BudgetConfig(_Section):
    """What a search may spend; it starts no trial that would take it past either limit."""

    trial_steps: int | None = Field(None, ge=1)
    """Optimizer steps summed over every trial (a trial's steps are reserved when it starts and released when
    an early stop ends it); a trial that would not fit is not started, and the search ends when nothing runs."""
    wall: str | None = None
    """Wall time of the whole search, e.g. 2h, 90m, 1h30m (--resume counts earlier invocations' time): no trial
    starts that the trials so far predict would end past it, and at the limit the running trials are stopped at
    their next report (their best checkpoints stay exportable)."""

    @field_validator("wall")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> BudgetConfig:
        if self.trial_steps is None and self.wall is None:
            raise ValueError("give trial_steps, wall or both (or drop tune.budget)")
        return self

    @property
    def wall_s(self) -> float | None:
        return None if self.wall is None else parse_duration(self.wall)


class TuneConfig(_Section):
    metric: Literal["eval_accuracy", "eval_loss", "eval_generated_accuracy"] = "eval_accuracy"
    """What picks the best trial (reported at every eval; eval_generated_accuracy needs eval.generate)."""
    mode: Literal["max", "min"] | None = None
    """max or min; null = max for the accuracies, min for eval_loss."""
    search: Literal["random", "grid", "optuna"] = "random"
    """How points are chosen. random: choice/uniform/loguniform sampled (grid keys enumerated, num_samples
    draws for each grid point); grid: every combination of the grid and choice values once, in an order
    shuffled by tune.seed (no ranges);
    optuna: Optuna's TPE sampler (pip install 'rayft[optuna]'), which proposes each point from the trials that
    finished (choice and ranges; no grid)."""
    num_samples: int | None = Field(None, ge=1)
    """Points to draw (random, optuna; for random each grid point gets this many); null = 8, 1 when the space
    is only grid keys, or as many as tune.budget allows when a budget is set; a random search over choice
    keys only draws distinct points (null: at most all of them) before it repeats one. Ignored by search: grid."""
    repeats: int = Field(1, ge=1)
    """Runs of each point, each with its own train.seed (train.seed, +1, ...), shown as a train.seed column in
    the results; grid and random only."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops trials whose metric trails at a milestone; fifo runs every trial to completion."""
    grace_share: float = Field(0.625, gt=0, lt=1)
    """ASHA: no trial is stopped before this share of its optimizer steps (rounded up to an eval); that step is
    the first milestone, and each later one is reduction_factor times further, up to the run's end."""
    grace_evals: int | None = Field(None, ge=1)
    """ASHA: put the first milestone at this many evals instead (overrides grace_share)."""
    reduction_factor: int = Field(3, ge=2)
    """ASHA: at each milestone a trial goes on only if its metric is not below the (1 - 1/reduction_factor)
    quantile of the trials that reached that milestone before it (ties go on)."""
    budget: BudgetConfig | None = None
    """Limits on what the search spends: trial_steps, wall (see tune.budget.*)."""
    memory_budget: str | None = None
    """Memory per GPU (or per CPU worker) the trials must fit, e.g. 16GiB: a trial the planner predicts above it is
    skipped before its workers start, and the best that fits is exported; null = what the machine has
    (--memory-limit overrides it)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Trials at once; null = as many as the machine's CPUs (or GPUs) fit, given each trial's workers."""
    seed: int = 0
    """Seed of the random and optuna samplers."""
    max_failures: int = Field(1, ge=-1)
    """Per trial: times its workers are restarted from the trial's latest checkpoint after one is lost; a
    trial whose failures are used up is recorded as failed with its reason, and the search goes on."""
    space: dict[str, Dimension] = {}
    """Dotted job keys to search, e.g. lora.rank: {choice: [8, 16]}, train.lr: {loguniform: [1e-5, 1e-3]}."""

    @field_validator("memory_budget")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "eval_loss" else "max")

    @property
    def samples(self) -> int:
        """Ray Tune's num_samples for this search (the trials, times each grid point's repeats)."""
        points = self.discrete_points()
        if self.search == "grid":
            return points or 1  # each point once
        if self.num_samples is not None:
            return self.num_samples
        if all(d.grid is not None for d in self.space.values()):
            return 1  # a grid's points once each (repeats, if asked, each with its own seed)
        if points is not None:  # every point once at most: a repeat of a point with the same seed is the same run
            return points if self.budget is not None else min(8, points)
        return -1 if self.budget is not None else 8  # -1: Tune draws until the budget ends the search

    def discrete_points(self) -> int | None:
        """How many distinct points the search enumerates, each once (a grid; a random search over choice keys
        only), else None."""
        if not self.space or self.search == "optuna" or (self.search == "random" and any(d.choice is None for d in self.space.values())):
            return None
        return math.prod(len(d.choice or d.grid or []) for d in self.space.values())


class SubmitConfig(_Section):
    """Read by `rayft submit` only: where a job on a Ray cluster finds its inputs and leaves its results."""

    storage_path: str | None = None
    """Where the run directory (checkpoints, merged model, manifest) is written, so results outlive the
    cluster: a path every node can write (local for one node, NFS for several) or a pyarrow filesystem URI
    (s3://bucket/prefix, gs://..., hdfs://..., file:///...). null = `output`, resolved on the cluster."""
    ship: list[Literal["model", "data"]] = ["data"]
    """Inputs packed into the submission (their directories, at most max_ship_mib in all); inputs not
    shipped must be readable at the same path on the cluster, which the job checks before training."""
    max_ship_mib: int = Field(100, ge=1)
    """Largest submission package; bigger inputs belong on storage the cluster reads."""
    driver_retries: int = Field(2, ge=0)
    """Times the job's driver on the cluster is started again when it dies (killed, out of memory); each
    new driver resumes from the run directory's latest checkpoint. A run that fails or is stopped is not retried."""


class ExportConfig(_Section):
    """How a finished run becomes a standalone model (`model/` in the run directory)."""

    merge: Literal["streamed", "in_memory"] = "streamed"
    """streamed: the base is read one safetensors shard at a time and each merged shard written before the next
    is read, so host memory stays near one input shard + twice one output shard (the tensors and their serialized copy) + the adapter at any model size.
    in_memory: load the whole model, merge with peft's merge_and_unload, save (several copies of the model in
    host memory; the reference the streamed export is tested against)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the exported weights: auto = the run's precision. fp32 keeps an adapter's update that bf16
    cannot hold (a short or low-learning-rate run moves weights by less than bf16's ~0.4% step), at twice
    the size on disk."""
    on: Literal["driver", "worker"] = "driver"
    """driver: export in the process that ran the job. worker: export as a Ray task on a cluster node with
    enough free memory (a GPU node's host RAM is usually the largest), writing to the run's storage."""
    parity_memory: str = "auto"
    """Host memory the end-to-end logits check may use (it holds the model in fp32 about 2.8 times over):
    a size such as 64GiB, 0 to skip it, or auto = what the host has free when the export starts. A model too
    large for it is checked layer by layer only, and the manifest says so."""

    @field_validator("parity_memory")
    @classmethod
    def _size(cls, value: str) -> str:
        if value not in ("auto", "0"):
            parse_size(value)
        return value

    def precision(self, run_precision: str) -> str:
        """The exported weights' precision: export.dtype, or the run's for auto."""
        return run_precision if self.dtype == "auto" else self.dtype

    def parity_bytes(self) -> int | None:
        """The limit in bytes; None for auto."""
        return None if self.parity_memory == "auto" else 0 if self.parity_memory == "0" else parse_size(self.parity_memory)


class GenerateConfig(_Section):
    """Generation-based evaluation: greedy generate() on eval rows, compared with the expected answer."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Tokens generated per row at most (the answer's length in tokens, plus its end-of-turn token, is enough)."""
    samples: int = Field(8, ge=1)
    """Eval rows generated for at each eval (the first ones of data.eval); exact match on normalized text
    (lower case, whitespace collapsed, trailing punctuation dropped)."""


class EvalConfig(_Section):
    """What an eval measures besides teacher-forced loss and answer accuracy."""

    at_start: bool = False
    """Also evaluate before the first optimizer step (the "before" number: initial_eval_accuracy in the
    manifest), as HF Trainer's eval_on_start. Off by default: it delays the first step by a whole eval."""
    generate: GenerateConfig | None = None
    """Generate answers for a few eval rows (eval_generated_accuracy) at each eval and with the merged model
    after export; null: teacher-forced metrics only."""


class MlflowConfig(_Section):
    tracking_uri: str
    """The MLflow tracking server, e.g. http://mlflow.internal:5000 (or file:/path). Credentials come from the
    environment only: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    experiment: str = "rayft"
    """Experiment the run is logged under (created if missing)."""
    run_name: str | None = None
    """The MLflow run's name (default: the run directory's name)."""
    log_model: bool = False
    """Also upload the merged model as an artifact (it is as large as the model)."""


class WandbConfig(_Section):
    project: str
    """Weights & Biases project."""
    entity: str | None = None
    """Team or user the project belongs to (default: the API key's)."""
    mode: Literal["online", "offline"] = "online"
    """offline: write the run under RUN_DIR/wandb/ for a later `wandb sync`, with no network. The API key
    comes from the environment only (WANDB_API_KEY)."""
    log_model: bool = False
    """Also store the merged model as an artifact."""


class TrackingConfig(_Section):
    """Where every reported metric goes besides metrics.jsonl. Only one process per run logs (the driver,
    from the metrics rank 0 writes); a tracker that is down warns once and the run goes on."""

    tensorboard: bool = True
    """TensorBoard events under RUN_DIR/tb/ (tensorboard --logdir RUN_DIR/tb)."""
    mlflow: MlflowConfig | None = None
    """Log params, metrics and artifacts to an MLflow tracking server (pip install 'rayft[mlflow]')."""
    wandb: WandbConfig | None = None
    """Log to Weights & Biases (pip install 'rayft[wandb]')."""


class JobConfig(_Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: the run directory is <output>/<name>-<timestamp>."""
    model: str
    """Base model: a local Hugging Face directory (or a hub id where a hub is reachable)."""
    data: DataConfig
    """Where the rows are and which columns to read."""
    method: Method = "qlora"
    """full (every weight) | lora (adapters over a bf16/fp16/fp32 base) | qlora (adapters over a 4-bit base)."""
    lora: LoraConfig = LoraConfig()
    """Adapter shape (lora and qlora)."""
    quantization: QuantizationConfig = QuantizationConfig()
    """4-bit storage of the frozen base (qlora)."""
    precision: Precision = "bf16"
    """How the maths runs: bf16 | fp16 (with loss scaling) | fp32."""
    train: TrainConfig = TrainConfig()
    """Optimisation and cadence."""
    scaling: ScalingConfig = ScalingConfig()
    """Workers and devices."""
    deepspeed: DeepSpeedConfig | None = None
    """Shard training with DeepSpeed ZeRO (null: plain PyTorch data parallel)."""
    freeze: list[str] = []
    """Module-name prefixes kept frozen in full fine-tuning (e.g. model.vision_tower)."""
    tune: TuneConfig | None = None
    """The search `rayft tune` runs over this job (ignored by `rayft train`)."""
    output: str = "./runs"
    """Directory that receives run directories."""
    submit: SubmitConfig = SubmitConfig()
    """Running on a Ray cluster with `rayft submit` (ignored by `rayft train`)."""
    export: ExportConfig = ExportConfig()
    """The merged standalone model written at the end of a run (and by `rayft merge`)."""
    eval: EvalConfig = EvalConfig()
    """Generation-based evaluation, besides the teacher-forced metrics every eval reports."""
    tracking: TrackingConfig = TrackingConfig()
    """TensorBoard, MLflow and Weights & Biases tracking of every run and search."""

    @model_validator(mode="before")
    @classmethod
    def _quantization_follows_method(cls, raw: Any) -> Any:
        # The one default that depends on another field: a base is 4-bit only for qlora unless said otherwise.
        if isinstance(raw, Mapping) and raw.get("method", "qlora") != "qlora":
            quant = raw.get("quantization") or {}
            if isinstance(quant, Mapping) and "type" not in quant:
                raw = {**raw, "quantization": {**quant, "type": "none"}}
        return raw

    @property
    def quantized(self) -> bool:
        return self.method == "qlora" and self.quantization.type != "none"


# ----------------------------------------------------------------------------------------------------
# Problems, overrides, loading


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def parse_set(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so numbers, booleans and lists keep their types)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([Problem(item, "an override must look like key.path=value", "e.g. --set train.lr=1e-4")])
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted keys set. The same function serves `--set` and Tune trials."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        dotted.set_in(out, key, value)
    return out


_PATH_KEYS = (("model",), ("data", "train"), ("data", "eval"), ("output",), ("submit", "storage_path"))


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in a job file resolve against the file's directory, so a job runs from any cwd."""
    out = json.loads(json.dumps(raw))
    for keys in _PATH_KEYS:
        node = out
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(keys[-1]), str):
            continue
        value = os.path.expanduser(node[keys[-1]])
        candidate = base / value
        is_hub_id = keys == ("model",) and not value.startswith((".", "/")) and not candidate.exists()
        if not os.path.isabs(value) and not is_hub_id and "://" not in value:
            node[keys[-1]] = str(candidate.resolve())
    return out


# What a value should have been, for each pydantic type error, in the words a job file uses.
_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_parsing_size": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping of keys",
    "model_type": "a section of keys",
    "model_attributes_type": "a section of keys",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    """Each schema error as a Problem that echoes the value given, says what is allowed and how to fix it."""
    # load_search validates tune: and each searched dimension on their own: their locations start there
    root = {"TuneConfig": TuneConfig, "Dimension": Dimension}.get(err.title, JobConfig)
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        path = ".".join(loc) or "(job)"
        kind = e["type"]
        if kind == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            fix = f"did you mean `{close[0]}`?" if close else f"remove it; known keys: {', '.join(known)}"
            problems.append(Problem(path, "unknown key", fix))
            continue
        field, section = _schema_at(loc, root)
        given = _shown(e.get("input"))
        if kind == "missing":
            problems.append(Problem(path, e["msg"], "add it to the job file"))
        elif kind == "literal_error":
            expected = e["ctx"]["expected"]
            problems.append(Problem(path, f"got {given}: expected {expected}", f"use {expected}"))
        elif kind in _RANGE_ERRORS:
            problems.append(_range_problem(path, field, e["ctx"], given))
        elif kind in ("model_type", "model_attributes_type") and section is not None:
            problems.append(_section_problem(path, section, given))
        elif kind in _EXPECTED:
            example = _example(field)
            fix = f"set {path} to {_EXPECTED[kind]}" + (f", e.g. {example}" if example else "")
            problems.append(Problem(path, f"got {given}: expected {_EXPECTED[kind]}", fix))
        else:
            if field is not None:
                doc = field.description
            else:  # the whole of `root` (an empty location), or past the schema's named keys
                doc = section.__doc__ if section is not None else None
            fix = f"see its doc: {' '.join(doc.split())}" if doc else f"see {path} in the job schema (orchestrator/config.py)"
            problems.append(Problem(path, e["msg"].replace("Input should be", "should be"), fix))
    return problems


def _schema_at(loc: list[str], root: type[BaseModel]) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    """The field an error location names and, when it is a section, the section's model (`root` for an empty
    location). Both None once the location leaves named keys (a list index, a dict key, a union member)."""
    field: FieldInfo | None = None
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None, None
        # a section may be optional (`DeepSpeedConfig | None`): look inside the union, as _known_keys does
        sections = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
        model = sections[0] if sections else None
    return field, model


def _range_problem(path: str, field: FieldInfo | None, ctx: Mapping[str, Any], given: str) -> Problem:
    """A number out of range, with the field's whole allowed range read from its Ge/Gt/Le/Lt constraints
    (pydantic's error names only the bound broken, which is all there is without a field)."""
    found: dict[str, Any] = {**ctx, **bounds(field)}
    limits = {op: found[op] for op in _BOUNDS if op in found}  # lower bound first
    allowed = bounds_text(limits)
    if set(limits) == {"ge", "le"}:
        allowed_words = f"from {number_text(limits['ge'])} to {number_text(limits['le'])}"
    else:
        allowed_words = allowed
    return Problem(path, f"{given} is out of range: must be {allowed}", f"set {path} to {_number_kind(field)} {allowed_words}")


def bounds(field: FieldInfo | None) -> dict[str, Any]:
    """A field's numeric bounds from its Ge/Gt/Le/Lt constraints, lower bound first: {"ge": 1, "le": 8}."""
    found: dict[str, Any] = {}
    for constraint in field.metadata if field else []:
        if isinstance(constraint, (Ge, Gt, Le, Lt)):
            found.update((op, getattr(constraint, op)) for op in _BOUNDS if hasattr(constraint, op))
    return {op: found[op] for op in _BOUNDS if op in found}


def bounds_text(limits: Mapping[str, Any]) -> str:
    """{"ge": 1, "le": 8} -> ">= 1 and <= 8", as the job file's errors and its reference say it."""
    return " and ".join(f"{_BOUNDS[op]} {number_text(value)}" for op, value in limits.items())


def number_text(value: float) -> str:
    """A bound as a job file would write it: 1, not 1.0; 0.5 as is."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _number_kind(field: FieldInfo | None) -> str:
    annotation = field.annotation if field else None
    return "a whole number" if int in (annotation, *get_args(annotation)) else "a number"


def _shown(value: Any) -> str:
    """A value as given, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _example(field: FieldInfo | None) -> str | None:
    """The field's default as a job file writes it, to show as an example; None when it has none worth showing."""
    default = None if field is None or field.is_required() else field.default
    if not isinstance(default, (bool, int, float, str, list)) or default in ("", []):
        return None
    return default if isinstance(default, str) else json.dumps(default)


def _section_problem(path: str, section: type[BaseModel], given: str) -> Problem:
    """A section (a mapping of keys) given a scalar or a list: name its keys, never the model behind it."""
    keys = list(section.model_fields)
    listed = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    example = _example(section.model_fields[keys[0]]) or "..."
    if path == "(job)":  # a searched dimension, validated on its own
        return Problem(path, f"expected a section of keys ({listed}), got {given}", f"give one of its keys, e.g. {{{keys[0]}: {example}}}")
    return Problem(path, f"{path} is a section of keys ({listed}), got {given}", f"set one of its keys, e.g. --set {path}.{keys[0]}={example}")


def _without(raw: Mapping[str, Any], locs: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(raw))
    for loc in locs:
        node: Any = out
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(part)
        # a section may be optional (`DeepSpeedConfig | None`): look inside the union
        sections = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)] if field else []
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def gpu_present() -> bool:
    """Cheap, import-free: the controller never imports torch to answer this."""
    return shutil.which("nvidia-smi") is not None


def uses_gpu(job: JobConfig, gpus: bool | None = None) -> bool:
    """The one "use a GPU?" rule: scaling.gpu on, or auto where a GPU is visible (gpus: known presence)."""
    return job.scaling.gpu == "on" or (job.scaling.gpu == "auto" and (gpu_present() if gpus is None else gpus))


def check_job(job: JobConfig, *, local_files: bool = True, gpus: bool | None = None) -> tuple[list[Problem], list[str]]:
    """Cross-field, architecture and filesystem checks. Returns (problems, warnings)."""
    from orchestrator import architectures

    problems: list[Problem] = []
    warnings: list[str] = []
    gpus = gpu_present() if gpus is None else gpus

    if job.method == "qlora" and job.quantization.type == "none":
        problems.append(
            Problem("quantization.type", "qlora needs a 4-bit base", "set quantization.type: nf4 (or fp4), or use method: lora")
        )
    if job.method != "qlora" and job.quantization.type != "none":
        problems.append(
            Problem(
                "quantization.type",
                f"{job.quantization.type} quantization applies to qlora only, not method: {job.method}",
                "set method: qlora, or quantization.type: none",
            )
        )
    if job.data.batching == "tokens" and job.data.batch_tokens is None:
        problems.append(Problem("data.batch_tokens", "batching: tokens needs a token budget", f"set data.batch_tokens, e.g. {job.train.micro_batch_size * job.data.max_length}"))
    elif job.data.batching == "tokens" and job.data.batch_tokens < job.data.max_length:  # type: ignore[operator]
        problems.append(
            Problem("data.batch_tokens", f"{job.data.batch_tokens} is below data.max_length={job.data.max_length}: the longest row would not fit",
                    f"set data.batch_tokens >= {job.data.max_length}")
        )
    elif job.data.batch_tokens is not None and job.data.batching != "tokens":
        problems.append(Problem("data.batch_tokens", f"applies to batching: tokens, not {job.data.batching}", "set data.batching: tokens, or remove batch_tokens"))
    if isinstance(job.lora.targets, list) and not job.lora.targets:
        problems.append(Problem("lora.targets", "empty list", "use targets: auto or name at least one module"))
    if job.deepspeed is not None:
        problems.extend(_deepspeed_problems(job))
    if job.freeze and job.method != "full":
        problems.append(Problem("freeze", f"applies to method: full (with {job.method} only adapters train)", "remove freeze"))
    if job.tune is not None and job.tune.metric == "eval_generated_accuracy" and (job.eval.generate is None or not job.data.eval):
        problems.append(Problem("tune.metric", "eval_generated_accuracy is reported only when eval.generate is set and there is a data.eval file",
                                "set eval.generate: {samples: 16} (and data.eval), or use metric: eval_accuracy"))
    if job.scaling.gpu == "on" and not gpus:
        problems.append(Problem("scaling.gpu", "on, but no CUDA GPU is visible (nvidia-smi not found)", "use gpu: auto or off"))
    use_gpu = uses_gpu(job, gpus)
    if job.precision == "fp16" and not use_gpu:
        warnings.append(
            "precision: fp16 on a CPU-only run works (with a GradScaler) but is tens of times slower than bf16 "
            "there, which CPUs with avx512_bf16 run natively; prefer precision: bf16"
        )

    problems.extend(_tracking_problems(job, local_files))
    if local_files:
        model_dir = Path(job.model)
        if not model_dir.is_dir():
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            if offline or job.model.startswith((".", "/")):
                problems.append(
                    Problem("model", f"not a local directory: {job.model}", "point model at a directory holding config.json")
                )
            else:
                warnings.append(f"model: {job.model} is not a local directory; treating it as a hub id")
        elif not (model_dir / "config.json").is_file():
            problems.append(Problem("model", f"{job.model} has no config.json", "point model at a Hugging Face model directory"))
        else:
            try:
                arch = architectures.for_model_dir(model_dir)
            except architectures.UnknownArchitecture as e:
                if job.method != "full" and job.lora.targets == "auto":
                    problems.append(Problem("model", str(e), "name lora.targets explicitly, or use method: full"))
                else:
                    warnings.append(str(e))
            else:
                if job.method not in arch.methods:
                    allowed = " or ".join(f"method: {m}" for m in arch.methods)
                    problems.append(
                        Problem("method", f"{arch.name} does not support {job.method} ({arch.note or 'not in its capability matrix'})", f"use {allowed}")
                    )
                if job.lora.train_vision and arch.kind == "text":
                    problems.append(Problem("lora.train_vision", f"{arch.name} has no vision tower", "set train_vision: false"))

        for key, value in (("data.train", job.data.train), ("data.eval", job.data.eval)):
            if value is None:
                continue
            if not value.endswith(DATA_SUFFIXES):
                problems.append(Problem(key, f"{value}: unsupported file type", "use a .parquet or .jsonl file"))
            elif not Path(value).is_file():
                problems.append(Problem(key, f"file not found: {value}", "check the path (relative paths resolve against the job file)"))
    return problems, warnings


def _tracking_problems(job: JobConfig, local_files: bool) -> list[Problem]:
    """The MLflow URI's form (credentials belong in the environment), and the clients a tracker needs where
    this process is the one that logs (not for `rayft submit`: the cluster's environment has its own)."""
    import importlib.util
    from urllib.parse import urlsplit

    problems = []
    mlflow = job.tracking.mlflow
    if mlflow is not None:
        uri = mlflow.tracking_uri
        parts = urlsplit(uri)
        key = "tracking.mlflow.tracking_uri"
        if parts.scheme in ("http", "https"):
            if not parts.hostname:
                problems.append(Problem(key, f"{uri!r} names no host", "give e.g. http://mlflow.internal:5000"))
            elif parts.username or parts.password:
                problems.append(Problem(key, "the URI carries credentials, which would end up in logs and in the job file",
                                        "remove user:password@ and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"))
            try:
                parts.port  # noqa: B018 (raises on a bad port)
            except ValueError:
                problems.append(Problem(key, f"{uri!r}: the port is not a number", "give e.g. http://mlflow.internal:5000"))
        elif parts.scheme not in ("file", "databricks"):
            problems.append(Problem(key, f"{uri!r} is not an MLflow tracking URI", "give http(s)://host:port of a tracking server, or file:/path"))
        if local_files and importlib.util.find_spec("mlflow") is None:
            problems.append(Problem("tracking.mlflow", "the MLflow client is not installed", "pip install 'rayft[mlflow]' (or remove tracking.mlflow)"))
    if job.tracking.wandb is not None and local_files and importlib.util.find_spec("wandb") is None:
        problems.append(Problem("tracking.wandb", "the wandb client is not installed", "pip install 'rayft[wandb]' (or remove tracking.wandb)"))
    return problems


def _deepspeed_problems(job: JobConfig) -> list[Problem]:
    ds = job.deepspeed
    assert ds is not None
    problems = []
    if ds.offload_params != "none" and ds.stage != 3:
        problems.append(Problem("deepspeed.offload_params", f"needs ZeRO stage 3 (stage is {ds.stage})", "set deepspeed.stage: 3 or offload_params: none"))
    if job.method == "qlora" and ds.stage == 3:
        problems.append(
            Problem("deepspeed.stage", "qlora cannot run under ZeRO-3: 4-bit weights cannot be partitioned", "use method: full, or deepspeed.stage: 0-2, or drop deepspeed")
        )
    if job.method == "lora" and ds.stage == 3:
        problems.append(Problem("deepspeed.stage", "lora under ZeRO-3 is not supported yet", "use deepspeed.stage: 0-2 (adapters are small), or method: full"))
    if job.method == "qlora" and ds.offload_optimizer != "none":
        problems.append(Problem("deepspeed.offload_optimizer", "not supported with qlora", "set offload_optimizer: none"))
    flat = dotted.flatten(ds.overrides)
    global_batch = job.train.micro_batch_size * job.train.grad_accum * job.scaling.workers
    for key, expected in (
        ("train_batch_size", global_batch),
        ("train_micro_batch_size_per_gpu", job.train.micro_batch_size),
        ("gradient_accumulation_steps", job.train.grad_accum),
    ):
        if key in flat and flat[key] != expected:
            problems.append(
                Problem(
                    f"deepspeed.overrides.{key}",
                    f"{flat[key]} disagrees with train.micro_batch_size x train.grad_accum x scaling.workers = {global_batch}"
                    if key == "train_batch_size"
                    else f"{flat[key]} disagrees with the job ({expected})",
                    "set batch sizes in train: (micro_batch_size, grad_accum) and drop this override",
                )
            )
    for key in ("bf16.enabled", "fp16.enabled"):
        if key in flat:
            problems.append(Problem(f"deepspeed.overrides.{key}", "precision is set by the job's precision key", "set precision: bf16 | fp16 | fp32"))
    return problems


def load_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem(str(path), "job file not found", "check the path")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([Problem(str(path), f"not valid YAML: {e}", "fix the YAML syntax")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([Problem(str(path), "a job file must be a mapping of keys", "see `rayft validate --help`")])
    return _resolve_paths(raw, path.parent.resolve())


def build_job(raw: Mapping[str, Any], sets: Iterable[str] = (), *, local_files: bool = True) -> tuple[JobConfig, list[str]]:
    """Raw mapping + `--set` items -> validated JobConfig and warnings; raises ConfigError with every problem."""
    problems: list[Problem] = []
    overrides: dict[str, Any] = {}
    for item in sets:
        try:
            key, value = parse_set(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        overrides[key] = value
    raw = apply_overrides(raw, overrides)
    raw = _resolve_paths(raw, Path.cwd()) if overrides else raw
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as e:
        # Report the schema's problems and, so that every problem shows at once, the cross-field and
        # filesystem problems of what remains once the bad keys fall back to their defaults.
        problems.extend(_pydantic_problems(e))
        reported = {p.path for p in problems}
        try:
            partial = JobConfig.model_validate(_without(raw, [err["loc"] for err in e.errors()]))
        except ValidationError:
            raise ConfigError(problems) from None
        problems.extend(p for p in check_job(partial, local_files=local_files)[0] if p.path not in reported)
        raise ConfigError(problems) from None
    found, warnings = check_job(job, local_files=local_files)
    problems.extend(found)
    if problems:
        raise ConfigError(problems)
    return job, warnings


def load_job(path: str | Path, sets: Iterable[str] = (), *, local_files: bool = True) -> tuple[JobConfig, list[str]]:
    return build_job(load_raw(path), sets, local_files=local_files)


def load_search(path: str | Path, sets: Iterable[str] = ()) -> tuple[JobConfig, dict[str, Any], list[str]]:
    """A job with a `tune:` section: (job, the raw job trials start from, warnings). Every value the space
    can take is applied with the same function as --set and validated, so a key or value the job schema
    would refuse fails here, naming the key, before anything starts. Every problem is reported at once."""
    raw = load_raw(path)
    raw = _resolve_paths(apply_overrides(raw, dict(parse_set(item) for item in sets)), Path.cwd())
    # Trials start from what the user wrote (not the resolved dump), so schema defaults that follow other
    # keys (quantization follows method) still follow a searched key.
    base = {k: v for k, v in raw.items() if k != "tune"}
    problems: list[Problem] = []
    tune_raw = raw.get("tune")
    if not isinstance(tune_raw, Mapping):
        problems.append(Problem("tune", "the job has no tune: section", "add tune: {space: {...}} (see README)"))
        tune_raw = {}
    space_raw = tune_raw.get("space") or {}
    if not space_raw:
        problems.append(Problem("tune.space", "empty search space", "add at least one dotted key, e.g. lora.rank: {choice: [8, 16]}"))
    try:
        TuneConfig.model_validate({**tune_raw, "space": {}})
    except ValidationError as e:
        problems.extend(Problem(f"tune.{p.path}", p.message, p.fix) for p in _pydantic_problems(e))
    try:
        build_job(base)
    except ConfigError as e:
        problems.extend(e.problems)
    for key, dim_raw in space_raw.items():
        try:
            dim = Dimension.model_validate(dim_raw)
        except ValidationError as e:
            problems.extend(Problem(f"tune.space.{key}", p.message.removeprefix("Value error, "), p.fix) for p in _pydantic_problems(e))
            continue
        if key.split(".")[0] in ("tune", "name", "output"):
            problems.append(Problem(f"tune.space.{key}", "cannot be searched", "search model, data, method, lora, quantization, precision, train or scaling keys"))
            continue
        for value in dim.values_to_check():
            try:
                build_job(apply_overrides(base, {key: value}))
            except ConfigError as e:
                for p in e.problems:
                    prefix = f"value {value!r}: " if p.path == key else f"value {value!r}: {p.path}: "
                    problems.append(Problem(f"tune.space.{key}", prefix + p.message, p.fix))
    problems.extend(_search_problems(tune_raw, space_raw))
    if problems:
        raise ConfigError(problems)
    job, warnings = build_job(raw)
    return job, base, warnings


def _search_problems(tune_raw: Mapping[str, Any], space_raw: Mapping[str, Any]) -> list[Problem]:
    """What tune.search, num_samples and repeats allow of the space's dimensions."""
    search, problems = tune_raw.get("search", "random"), []
    kinds = {k: next(iter(d)) for k, d in space_raw.items() if isinstance(d, Mapping) and len(d) == 1}
    if search == "grid":
        problems += [Problem(f"tune.space.{k}", f"search: grid needs listed values, not a {kind} range", "give grid: [...] or choice: [...], or use search: random or optuna")
                     for k, kind in kinds.items() if kind in ("uniform", "loguniform")]
    if search == "optuna":
        problems += [Problem(f"tune.space.{k}", "search: optuna does not enumerate grids", "give choice: [...] (Optuna picks among the values), or use search: grid")
                     for k, kind in kinds.items() if kind == "grid"]
    if search == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append(Problem("tune.search", "optuna is not installed", "pip install 'rayft[optuna]', or use search: random"))
    repeats = tune_raw.get("repeats", 1)
    if isinstance(repeats, int) and repeats > 1:
        if search == "optuna":
            problems.append(Problem("tune.repeats", "search: optuna proposes each point once", "use search: grid or random to repeat points"))
        if "train.seed" in space_raw:
            problems.append(Problem("tune.repeats", "repeats gives each run its own train.seed, and train.seed is also searched", "drop one of the two"))
    samples = tune_raw.get("num_samples")
    if search != "optuna" and kinds and all(kind == "grid" for kind in kinds.values()) and isinstance(samples, int) and samples > 1:
        problems.append(Problem("tune.num_samples", f"{samples} would run every grid point {samples} times with the same seed: the same weights, {samples} times over",
                                f"drop num_samples; to repeat each point with its own seed, set tune.repeats: {samples}"))
    return problems


def to_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
