"""The checks a valid schema cannot make alone: across fields (qlora needs a 4-bit base, ZeRO-3 and
adapters, batch sizes in DeepSpeed overrides), against the model's architecture, the files named, the
trackers' clients, and whether the run uses a GPU (gpu_present, uses_gpu)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from orchestrator import dotted
from orchestrator.config.job import JobConfig
from orchestrator.config.problems import Problem
from orchestrator.config.sections import DATA_SUFFIXES


def gpu_present() -> bool:
    """Cheap, import-free: the controller never imports torch to answer this."""
    return shutil.which("nvidia-smi") is not None


def uses_gpu(job: JobConfig, gpus: bool | None = None) -> bool:
    """The one "use a GPU?" rule: scaling.gpu on, or auto where GPUs are there to use (gpus: whether the
    Ray cluster has them, launch.Capacity; None: whether this machine has one)."""
    return job.scaling.gpu == "on" or (job.scaling.gpu == "auto" and (gpu_present() if gpus is None else gpus))


COMPONENTS = ("vision", "projector", "language")


def _component_problems(job: JobConfig, arch: Any) -> list[Problem]:
    """freeze and train.lr_groups name components the architecture has, and components that train."""
    problems = []
    have = arch.component_names
    for name in job.freeze:
        if name in COMPONENTS and name not in have:
            problems.append(Problem("freeze", f"{arch.name} has no {name} component (it has {', '.join(have)})", f"remove {name} from freeze"))
    if job.lora.train_projector and "projector" not in have:
        problems.append(Problem("lora.train_projector", f"{arch.name} has no projector", "set train_projector: false"))
    elif job.lora.train_projector and job.method == "full":
        problems.append(Problem("lora.train_projector", "applies to lora/qlora (method: full trains the projector anyway)", "remove train_projector"))
    for name in job.train.lr_groups:
        key = f"train.lr_groups.{name}"
        if name not in have:
            problems.append(Problem(key, f"{arch.name} has no {name} component (it has {', '.join(have)})", f"remove {name} from train.lr_groups"))
        elif name in job.freeze:
            problems.append(Problem(key, f"{name} is frozen (freeze lists it): no weight of it trains", f"remove {name} from freeze or from train.lr_groups"))
        elif job.method != "full" and ((name == "projector" and not job.lora.train_projector) or (name == "vision" and not job.lora.train_vision)):
            why = "set lora.train_vision: true (adapters on the vision tower)" if name == "vision" else "set lora.train_projector: true"
            problems.append(Problem(key, f"method: {job.method} trains adapters on the language model only: no {name} weight trains", why))
    return problems


def flash_attn_importable() -> bool:
    """Whether the flash_attn package (FlashAttention 2's kernels) is installed here, without importing it."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _attention_problems(job: JobConfig, use_gpu: bool, cluster: bool) -> list[Problem]:
    """train.attn_implementation: flash_attention_2 needs a GPU, half precision and the flash_attn package. A
    cluster's workers are checked where they run (jobs/model.py), not on this machine."""
    if job.train.attn_implementation != "flash_attention_2":
        return []
    key, said = "train.attn_implementation", "flash_attention_2"
    if job.precision == "fp32":
        return [Problem(key, f"{said} runs in bf16 or fp16 only, not precision: fp32", "set precision: bf16, or attn_implementation: sdpa")]
    if cluster:
        return []
    if not use_gpu:
        return [Problem(key, f"{said} needs a CUDA GPU, and this run trains on the CPU", "use attn_implementation: auto or sdpa")]
    if not flash_attn_importable():
        return [Problem(key, f"{said}, but the flash_attn package is not installed", "pip install flash-attn --no-build-isolation, or use attn_implementation: auto")]
    return []


def check_job(job: JobConfig, *, local_files: bool = True, gpus: bool | None = None, cluster: bool = False) -> tuple[list[Problem], list[str]]:
    """Cross-field, architecture and filesystem checks. Returns (problems, warnings).
    cluster: the job runs on a Ray cluster, not here: whether it has GPUs is the cluster's to say once Ray
    is up (launch.Capacity), not this machine's."""
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
    budgeted = job.data.batching in ("tokens", "packed")
    if budgeted and job.data.batch_tokens is None:
        problems.append(Problem("data.batch_tokens", f"batching: {job.data.batching} needs a token budget",
                                f"set data.batch_tokens, e.g. {job.train.micro_batch_size * job.data.max_length}"))
    elif budgeted and job.data.batch_tokens < job.data.max_length:  # type: ignore[operator]
        problems.append(
            Problem("data.batch_tokens", f"{job.data.batch_tokens} is below data.max_length={job.data.max_length}: the longest row would not fit",
                    f"set data.batch_tokens >= {job.data.max_length}")
        )
    elif job.data.batch_tokens is not None and not budgeted:
        problems.append(Problem("data.batch_tokens", f"applies to batching: tokens or packed, not {job.data.batching}",
                                "set data.batching: tokens (or packed), or remove batch_tokens"))
    if job.data.min_pixels is not None and job.data.max_pixels is not None and job.data.min_pixels > job.data.max_pixels:
        problems.append(Problem("data.min_pixels", f"{job.data.min_pixels} is above data.max_pixels={job.data.max_pixels}",
                                "set min_pixels <= max_pixels, or remove one of them"))
    if isinstance(job.lora.targets, list) and not job.lora.targets:
        problems.append(Problem("lora.targets", "empty list", "use targets: auto or name at least one module"))
    if job.deepspeed is not None:
        problems.extend(_deepspeed_problems(job))
    if job.freeze and job.method != "full":
        problems.append(Problem("freeze", f"applies to method: full (with {job.method} only adapters train)", "remove freeze"))
    if job.tune is not None and job.tune.metric == "eval_generated_accuracy" and (job.eval.generate is None or not job.data.eval):
        problems.append(Problem("tune.metric", "eval_generated_accuracy is reported only when eval.generate is set and there is a data.eval file",
                                "set eval.generate: {samples: 16} (and data.eval), or use metric: eval_accuracy"))
    if job.scaling.gpu == "on" and not gpus and not cluster:
        problems.append(Problem("scaling.gpu", "on, but no CUDA GPU is visible (nvidia-smi not found)", "use gpu: auto or off"))
    use_gpu = uses_gpu(job, gpus)
    problems.extend(_attention_problems(job, use_gpu, cluster))
    if job.precision == "fp16" and not use_gpu and not cluster:
        warnings.append(
            "precision: fp16 on a CPU-only run works (with a GradScaler) but is tens of times slower than bf16 "
            "there, which CPUs with avx512_bf16 run natively; prefer precision: bf16"
        )

    problems.extend(_tracking_problems(job, local_files))
    if local_files:
        from orchestrator import hub

        try:
            model_dir = Path(job.model_dir)
        except hub.HubError as e:
            problems.append(Problem(e.key, str(e), e.fix))
            model_dir = None
        if model_dir is None:
            pass
        elif not model_dir.is_dir():
            problems.append(Problem("model", f"not a local directory: {job.model}",
                                    "point model at a directory holding config.json, or name a Hugging Face hub model as org/name"))
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
                if job.data.batching == "packed":
                    problems.append(Problem("data.batching", f"packed: rayft has not checked that this architecture packs correctly ({e})",
                                            "use data.batching: tokens (padding instead of packing)"))
            else:
                if job.data.batching == "packed" and not arch.packs:
                    problems.append(Problem("data.batching", f"packed: {arch.name} cannot pack rows (its model code is not in transformers, "
                                            "so rayft cannot check packed positions against it)", "use data.batching: tokens (padding instead of packing)"))
                if job.method not in arch.methods:
                    allowed = " or ".join(f"method: {m}" for m in arch.methods)
                    problems.append(
                        Problem("method", f"{arch.name} does not support {job.method} ({arch.note or 'not in its capability matrix'})", f"use {allowed}")
                    )
                if job.lora.train_vision and arch.kind == "text":
                    problems.append(Problem("lora.train_vision", f"{arch.name} has no vision tower", "set train_vision: false"))
                problems.extend(_component_problems(job, arch))

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
