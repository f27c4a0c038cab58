"""The job file's sections: one frozen pydantic model per key that holds a section (data, lora, train,
scaling, export, tracking, ...), each field with its default and a one-line doc. Also the job file's
sizes and durations (parse_size, parse_duration), which the sections' validators read.

The search's section (tune:) is in tune.py and the whole job (JobConfig) in job.py, both built on Section.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


def number_as_text(value: Any) -> Any:
    """A size or duration key read as a number (YAML and --set read `0` or `3600` so): its text, for the
    key's own parser to accept (0: off) or refuse with the unit it wants."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# The base of every section: unknown keys refused, frozen, each field's doc read from its attribute docstring.
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(Section):
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
    max_pixels: int | None = Field(None, ge=1)
    """Image budget: an image of more pixels (width x height) is resized down to fit, aspect kept, before the
    processor sees it. Dynamic-resolution models (Qwen2-VL, Qwen2.5-VL) then make fewer image tokens (about
    pixels / 784); fixed-size ones (LLaVA, PaliGemma, Idefics3 per tile) only decode less. null: as stored."""
    min_pixels: int | None = Field(None, ge=1)
    """An image of fewer pixels is resized up to this many, aspect kept. null: as stored."""
    blind: bool = False
    """Replace every image by a uniform grey one (a control run: accuracy should stay at chance if the task needs the image)."""
    batching: Literal["rows", "length_grouped", "tokens", "packed"] = "rows"
    """How rows form micro batches: rows (train.micro_batch_size rows in shuffled order), length_grouped
    (the same rows per batch, batched with rows of similar length: less padding), tokens (as many rows
    as fit data.batch_tokens padded tokens per worker), or packed (rows concatenated into one sequence of at
    most data.batch_tokens tokens per worker: no padding, positions restarting at each row, no attention
    across rows; eval batches are packed the same way)."""
    encode_once: Literal["auto", "off"] = "auto"
    """auto: before training, every row is encoded once (in the driver's process for a small file, else by a Ray
    Data pass) and the tensors are kept beside the row store, for every epoch, resume and search trial, when
    they fit a quarter of the machine's memory and half the free disk; otherwise, or with off, Ray Data
    encodes rows as they stream to the workers."""
    batch_tokens: int | None = Field(None, ge=8)
    """With batching: tokens, the padded tokens (rows x longest row) of one worker's micro batch; with packed, the
    tokens of its one packed sequence. At least data.max_length."""


class LoraConfig(Section):
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
    train_projector: bool = False
    """Also train the projector (a VLM's vision-to-language layers) fully, beside the adapters (peft's
    modules_to_save); the export writes the trained projector into the merged model."""


class QuantizationConfig(Section):
    type: QuantType = "nf4"
    """How the frozen base is stored: nf4 | fp4 (4-bit, qlora only) | none. Defaults to none unless method is qlora."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (about 4.127 instead of 4.5 bits per parameter)."""


class TrainConfig(Section):
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
    lr_groups: dict[Literal["vision", "projector", "language"], float] = {}
    """Peak learning rates per component (vision tower, projector, language model, as orchestrator/architectures.py
    names their modules), e.g. {projector: 1e-4, vision: 1e-5}; a component not listed trains at lr. The
    schedule scales each the same way. Searchable as train.lr_groups.<component>."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """The attention kernel: auto = FlashAttention 2 on a GPU where the flash_attn package imports and precision
    is bf16 or fp16, else transformers' default (sdpa where the model supports it, eager otherwise); the start
    record in metrics.jsonl says which ran."""

    @field_validator("lr_groups")
    @classmethod
    def _rates(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [f"{k}: {v}" for k, v in value.items() if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"learning rates must be > 0 and <= 1, as train.lr: {', '.join(bad)}")
        return value


class DeepSpeedConfig(Section):
    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 + gradients, 3 + parameters."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state (and its step) in host memory (DeepSpeedCPUAdam)."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep parameters in host memory between uses (stage 3 only)."""
    overrides: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged over the generated config (dotted keys allowed: zero_optimization.reduce_bucket_size);
    what they change is recorded in the run directory's deepspeed.json."""


class ScalingConfig(Section):
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
    staging_dir: str | None = None
    """Where each worker writes a checkpoint before Ray Train copies it into the run's storage (then it is
    removed): a directory on every worker's node; null = the node's $TMPDIR. It needs room for one
    checkpoint per worker on the node: for full fine-tuning ~12 bytes per parameter split over the ZeRO
    workers (fp32 master weights and Adam's two moments) plus the weights, about 84 GB per node for a 7B;
    for lora/qlora the adapter and its optimizer state only (a few MB to a few hundred)."""


class SubmitConfig(Section):
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


class ExportConfig(Section):
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

    _parity_text = field_validator("parity_memory", mode="before")(number_as_text)

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


class GenerateConfig(Section):
    """Generation-based evaluation: greedy generate() on eval rows, compared with the expected answer."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Tokens generated per row at most (the answer's length in tokens, plus its end-of-turn token, is enough)."""
    samples: int = Field(8, ge=1)
    """Eval rows generated for at each eval (the first ones of data.eval); exact match on normalized text
    (lower case, whitespace collapsed, trailing punctuation dropped)."""


class EvalConfig(Section):
    """What an eval measures besides teacher-forced loss and answer accuracy."""

    at_start: bool = False
    """Also evaluate before the first optimizer step (the "before" number: initial_eval_accuracy in the
    manifest), as HF Trainer's eval_on_start. Off by default: it delays the first step by a whole eval."""
    generate: GenerateConfig | None = None
    """Generate answers for a few eval rows (eval_generated_accuracy) at each eval and with the merged model
    after export; null: teacher-forced metrics only."""


class MlflowConfig(Section):
    tracking_uri: str
    """The MLflow tracking server, e.g. http://mlflow.internal:5000 (or file:/path). Credentials come from the
    environment only: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    experiment: str = "rayft"
    """Experiment the run is logged under (created if missing)."""
    run_name: str | None = None
    """The MLflow run's name (default: the run directory's name)."""
    log_model: bool = False
    """Also upload the merged model as an artifact (it is as large as the model)."""


class WandbConfig(Section):
    project: str
    """Weights & Biases project."""
    entity: str | None = None
    """Team or user the project belongs to (default: the API key's)."""
    mode: Literal["online", "offline"] = "online"
    """offline: write the run under RUN_DIR/wandb/ for a later `wandb sync`, with no network. The API key
    comes from the environment only (WANDB_API_KEY)."""
    log_model: bool = False
    """Also store the merged model as an artifact."""


class TrackingConfig(Section):
    """Where every reported metric goes besides metrics.jsonl. Only one process per run logs (the driver,
    from the metrics rank 0 writes); a tracker that is down warns once and the run goes on."""

    tensorboard: bool = True
    """TensorBoard events under RUN_DIR/tb/ (tensorboard --logdir RUN_DIR/tb)."""
    mlflow: MlflowConfig | None = None
    """Log params, metrics and artifacts to an MLflow tracking server (pip install 'rayft[mlflow]')."""
    wandb: WandbConfig | None = None
    """Log to Weights & Biases (pip install 'rayft[wandb]')."""
