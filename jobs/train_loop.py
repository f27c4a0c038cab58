"""train_fn_per_worker: what every Ray Train worker runs, top to bottom.

setup (job, threads, device, data shard, model, optimizer) -> restore checkpoint -> optimizer steps
-> eval/report/checkpoint on cadence -> final eval + checkpoint. Rank 0 writes metrics.jsonl (jobs/metrics_log.py).

What the loop takes from Ray Train (rank, device, data shards, the checkpoint to continue from, report, node,
preemption notices) is one object, jobs/worker.py's Worker: built from Ray for a Ray Train worker, and without
Ray by jobs/local_worker.py (the GPU check, bench/gpu_check.py), so that the same loop runs where Ray is absent.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from jobs import attempts, collective, stream, zero
from jobs.batching import epoch_of
from jobs.checkpoint import CHECKPOINTS, META_FILE, STATE_FILE, WEIGHTS_FILE
from jobs.evaluate import answer_loss, evaluate, keeps_logits, to_device
from jobs.generate import EvalGenerator
from jobs.metrics_log import append_metrics, read_metrics
from jobs.model import (
    build_model,
    count_parameters,
    load_trainable_state,
    param_groups,
    torch_dtype,
    trainable_state,
)
from jobs.worker import Report, Worker, from_ray
from orchestrator import architectures
from orchestrator.config import JobConfig


def set_up_device(device: Any, precision: str, threads: int) -> None:
    """This process's torch for training on `device`: `threads` CPU threads (Ray sets OMP threads to the
    reservation); on CUDA the worker's own GPU (not cuda:0) for every default-device allocation, NCCL's
    included, and for an fp32 run TF32 matmuls and convolutions (Ampere and later: fp32 range, 10-bit
    mantissa inputs, fp32 accumulation; several times the fp32 rate; torch leaves matmuls in full fp32 by
    default). bf16/fp16 runs compute their matmuls in their own dtype under autocast."""
    import torch

    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def lr_lambda(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


@dataclass
class Training:
    """What a worker steps: the model as trained (plain, DDP- or DeepSpeed-wrapped) and what updates it."""

    model: Any
    core: Any
    """The unwrapped model: what checkpoints hold."""
    params: list[Any]
    optimizer: Any
    scheduler: Any
    scaler: Any
    """GradScaler (a no-op unless fp16); None under DeepSpeed, which scales fp16 losses itself."""
    autocast: Callable[[], Any]
    input_dtype: Any
    """Under DeepSpeed bf16/fp16 the weights are in that dtype and float inputs follow; else None."""
    deepspeed: bool
    ddp: bool
    max_grad_norm: float | None
    device: Any
    """The worker's training device: where restored state goes."""
    adapters: bool
    """lora/qlora: only adapter weights train (and are checkpointed)."""
    lr_groups: list[dict[str, Any]] = field(default_factory=list)
    """Each optimizer group's component, peak rate and parameter count (train.lr_groups; one group without it)."""
    keep_logits: bool = False
    """The model computes logits at the answer positions only (jobs/evaluate.answer_logits: logits_to_keep)."""
    zero3_config: Any = None
    """transformers' HfDeepSpeedConfig under ZeRO-3, else None. transformers holds it only weakly and asks it
    whether ZeRO-3 is on (to load each rank's partition of the model, and after): kept here, it lives as long
    as the training does."""


def unused_parameters_possible(job: JobConfig, arch: architectures.Architecture) -> bool:
    """Whether a trainable weight can get no gradient in a step: a VLM's vision tower and projector when they
    train (full fine-tuning, or lora.train_vision) are skipped by a micro batch of text-only rows, and LLaVA
    never reads its vision tower's last layer. Adapters on the language model (the default) always run."""
    return arch.kind == "vlm" and (job.method == "full" or job.lora.train_vision)


def build_training(
    job: JobConfig, arch: architectures.Architecture, device: Any, world: int, schedule: Callable[[int], float], ds_config: dict[str, Any] | None,
    ddp: bool | None = None, model: Any = None,
) -> Training:
    """ddp: wrap in DistributedDataParallel (default: with more than one worker). model: the trainable model
    (default: jobs/model.py's build_model from job.model_dir)."""
    import torch

    zero3_config = zero.hf_deepspeed_config(job, ds_config, arch) if ds_config else None
    ddp = world > 1 if ddp is None else ddp
    model = build_model(job, arch, device) if model is None else model
    keep = keeps_logits(model)
    groups = param_groups(model, job, arch)
    params = [p for _, ps, _ in groups for p in ps]
    # train.lr_groups: an optimizer group per component at its rate; without it, one list as always
    optimized = [{"params": ps, "lr": lr} for _, ps, lr in groups] if job.train.lr_groups else params
    rates = [{"component": part, "lr": lr, "params": sum(getattr(p, "ds_numel", p.numel()) for p in ps)} for part, ps, lr in groups]
    if ds_config:
        # DeepSpeed holds the weights in the run's precision (fp32 master copies in the optimizer), scales
        # fp16 losses, clips, accumulates and steps the scheduler at accumulation boundaries.
        engine, optimizer, scheduler = zero.initialize(
            model, ds_config, optimized, job.train.lr, job.train.weight_decay, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        )
        return Training(
            model=engine,
            core=engine.module,
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=None,
            autocast=nullcontext,
            input_dtype=torch_dtype(job.precision),
            deepspeed=True,
            ddp=False,
            max_grad_norm=None,  # DeepSpeed clips (gradient_clipping in its config)
            device=device,
            adapters=job.method != "full",
            keep_logits=keep,
            lr_groups=rates,
            zero3_config=zero3_config,
        )
    core = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters only where a trainable weight can miss a step's graph (DDP refuses that at the
        # next step, "Parameter indices which did not receive grad"); elsewhere it is a graph walk per step for nothing
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=unused_parameters_possible(job, arch))
    # The fused kernel updates each parameter in one pass; the default on CPU is a Python loop of ~10 elementwise
    # ops per parameter, which cost 25% of a full fine-tuning step of a 51M model here (bench/hf_compare.py).
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(optimized, lr=job.train.lr, weight_decay=job.train.weight_decay, fused=fused)
    return Training(
        model=model,
        core=core,
        params=params,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        scaler=torch.amp.GradScaler(device.type, enabled=job.precision == "fp16"),
        autocast=partial(torch.autocast, device.type, dtype=torch_dtype(job.precision), enabled=job.precision != "fp32"),
        input_dtype=None,
        deepspeed=False,
        ddp=ddp,
        max_grad_norm=job.train.max_grad_norm,
        device=device,
        adapters=job.method != "full",
        keep_logits=keep,
        lr_groups=rates,
    )


def optimizer_step(training: Training, batches: list[dict[str, Any]], device: Any) -> float:
    """One optimizer step over this worker's micro batches (gradient accumulation); returns the step's loss
    (the mean over micro batches)."""
    import torch

    t = training
    # Summed on the device and read once per step: reading each micro batch's loss (float()) would make the
    # host wait for the GPU at every micro batch instead of queueing the next one's kernels.
    step_loss: Any = 0.0
    for k, batch in enumerate(batches):
        labels = batch["labels"]  # stays on the CPU: answer_logits finds the answer positions there, without a GPU sync
        batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device, t.input_dtype)
        if t.deepspeed:
            loss = answer_loss(t.model, batch, labels, t.keep_logits)
            t.model.backward(loss)  # divides by grad_accum itself
            t.model.step()  # optimizer + scheduler only at the accumulation boundary
            step_loss = step_loss + loss.detach().float() / len(batches)
            continue
        # DDP all-reduces gradients on the last micro batch only
        sync = t.model.no_sync() if t.ddp and k < len(batches) - 1 else nullcontext()
        with sync:
            with t.autocast():
                loss = answer_loss(t.model, batch, labels, t.keep_logits) / len(batches)
            t.scaler.scale(loss).backward()
        step_loss = step_loss + loss.detach().float()
    if not t.deepspeed:
        if t.max_grad_norm:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_(t.params, t.max_grad_norm)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
    return float(step_loss)


class InjectedFault(RuntimeError):
    """The fault drill RAYFT_FAULT_AT_STEP: fails the run for good, as a bug would (rehearses --resume)."""


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function (the loop, below)."""
    with recording_fatal(Path(config["run_dir"])):
        _train(config)


@contextmanager
def recording_fatal(run_dir: Path) -> Iterator[None]:
    """An error that would repeat on a restart (a NaN loss, a row that went bad after validation, the fault
    drill) is recorded in the run directory: the restarts Ray Train makes (scaling.max_failures), or Tune
    makes of a trial run in its own actor (jobs/tune_worker.py), then fail at once with it instead of loading
    the model to fail again at the same step. A lost worker (SIGKILL, the OOM killer, a lost node) is not
    recorded: its restart continues from the latest checkpoint."""
    from jobs.data import DataError

    try:
        yield
    except (FloatingPointError, DataError, InjectedFault) as e:
        attempts.record_fatal(run_dir, "\n".join(e.problems) if isinstance(e, DataError) else str(e))
        raise


@dataclass
class Log:
    """metrics.jsonl as a worker writes it: rank 0 alone, each record stamped with its attempt and time."""

    run_dir: Path
    attempt: int
    writes: bool

    def __call__(self, record: dict[str, Any]) -> None:
        if self.writes:
            append_metrics(self.run_dir, {**record, "attempt": self.attempt, "time": record.get("time", time.time())})


def previous_attempts(run_dir: Path) -> tuple[int, int | None]:
    """(this attempt's number, the highest step the attempts before it reached: None if it is the first),
    from metrics.jsonl."""
    records = read_metrics(run_dir)
    return attempts.next_attempt(records), max((r.get("step") or 0 for r in records), default=0) if records else None


def restore(training: Training, checkpoint: Any) -> int:
    """Load Ray Train's checkpoint to continue from (a restart's, a --resume's) into training; its step, or 0
    without one."""
    if not checkpoint:
        return 0
    import torch
    from safetensors.torch import load_file

    with checkpoint.as_directory() as ckpt_dir:
        if training.deepspeed:
            # every rank its own shard; an adapter run's holds no frozen weights (they come from the base)
            _, client_state = training.model.load_checkpoint(ckpt_dir, load_module_strict=not training.adapters)
            return client_state["step"]
        load_trainable_state(training.core, load_file(os.path.join(ckpt_dir, WEIGHTS_FILE)))
        # saved by rank 0 from its device (cuda:0): every tensor comes back on this worker's own
        state = torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location=training.device, weights_only=False)
        training.optimizer.load_state_dict(state["optimizer"])
        training.scheduler.load_state_dict(state["scheduler"])
        training.scaler.load_state_dict(state["scaler"])
        return state["step"]


@dataclass
class Checkpoints:
    """A worker's reports (to Ray Train, or jobs/local_worker.py), each with a checkpoint of its step when asked for one."""

    training: Training
    job: JobConfig
    rank: int
    run_dir: Path
    total_steps: int
    last: int
    """The step of the newest checkpoint (the restored one's until this attempt takes one)."""
    kill_at: int | None
    """The fault drill RAYFT_KILL_IN_CHECKPOINT's step in a run's first attempt; None in a later one."""
    send: Report
    """Worker.report."""

    def save(self, step: int, metrics: dict[str, Any]) -> str | None:
        """The staged checkpoint directory of this rank, or None where it has nothing to report. Plain runs: rank 0
        writes trainable weights + optimizer state. ZeRO: every rank writes its shard and Ray merges the ranks'
        directories into one checkpoint. Adapters are also written whole by rank 0 (they are small and
        unpartitioned below ZeRO-3), so every adapter run merges the same way."""
        import torch
        from safetensors.torch import save_file

        t = self.training
        ckpt_dir = attempts.staging_dir(step, self.job.scaling.staging_dir)
        if t.deepspeed:
            # adapters: the engine's shard holds the trainable weights and their optimizer state, never the
            # frozen base (a bf16 7B's 15 GB per checkpoint otherwise)
            t.model.save_checkpoint(ckpt_dir, tag=f"step_{step}", client_state={"step": step}, exclude_frozen_parameters=self.job.method != "full")
        if self.rank == 0:
            if not t.deepspeed or self.job.method != "full":
                save_file(trainable_state(t.core), os.path.join(ckpt_dir, WEIGHTS_FILE))
            if not t.deepspeed:
                torch.save(
                    {"step": step, "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict()},
                    os.path.join(ckpt_dir, STATE_FILE),
                )
            Path(ckpt_dir, META_FILE).write_text(json.dumps(metrics))
        if self.rank == 0 or t.deepspeed:
            return ckpt_dir
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return None

    def report(self, metrics: dict[str, Any], step: int | None) -> None:
        """Report, with a checkpoint of `step` if given. Ray Train copies the staged checkpoint into storage and
        registers it only once the copy is complete; the staged copy is removed either way."""
        ckpt_dir = self.save(step, metrics) if step is not None else None
        try:
            drill = step is not None and step == self.kill_at
            upload = partial(kill_during_upload, self.run_dir) if drill else None
            # total_steps rides along so a search's budget (orchestrator/budget.py) knows what a trial will spend
            self.send({**metrics, "total_steps": self.total_steps}, ckpt_dir, upload)
        finally:
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        if step is not None:
            self.last = step


def kill_during_upload(run_dir: Path, checkpoint: Any, dir_name: str) -> Any:
    """The fault drill RAYFT_KILL_IN_CHECKPOINT=N: in a run's first attempt, copy half of step N's
    checkpoint into storage, then die as a SIGKILL would (rehearses a kill during a checkpoint write)."""
    import signal

    from jobs.checkpoint import registered_checkpoints

    # Ray Train registers a report when its controller next polls the workers (every 0.5 s): wait for the
    # one before, so the drill always kills the write of the newest checkpoint, not of one Ray never saw
    deadline = time.time() + 30
    while not registered_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    dest = run_dir / CHECKPOINTS / dir_name
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(checkpoint.path).rglob("*") if p.is_file())
    for f in files[: max(1, len(files) // 2)]:
        (dest / f.relative_to(checkpoint.path)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f.relative_to(checkpoint.path))
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


@dataclass
class Window:
    """This worker's optimizer steps since the last train record (log_every): their loss, rows and tokens."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    """Useful (non-pad) tokens."""
    padded: int = 0
    samples: int = 0
    t0: float = field(default_factory=time.time)

    def count(self, micro: list[Any], batches: list[dict[str, Any]]) -> None:
        """A step's rows and tokens, before it runs."""
        for b in batches:  # a packed micro batch (no attention_mask) has no padding
            self.tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            self.padded += b["input_ids"].numel()
        self.samples += sum(len(rows) for rows in micro)

    def add_loss(self, step_loss: float) -> None:
        self.loss, self.steps = self.loss + step_loss, self.steps + 1

    def mean_loss(self) -> float:
        return self.loss / max(1, self.steps)

    def record(self, step: int, epoch: float, lr: float, world: int, device: Any) -> dict[str, Any]:
        """The train record at `step`: the loss of the global batch (the mean over workers of each worker's
        mean) and every worker's rates together. An all-reduce: every rank calls it after the same step."""
        elapsed = time.time() - self.t0
        sums = collective.reduce([self.tokens, self.samples, self.loss, self.padded], device)
        return {
            "step": step,
            "epoch": epoch,
            "train_loss": float(sums[2]) / world / self.steps,
            "lr": lr,
            "tokens_per_s": float(sums[0]) / elapsed,  # useful (non-pad) tokens
            "padding": 1 - float(sums[0]) / max(1.0, float(sums[3])),
            "samples_per_s": float(sums[1]) / elapsed,
            "steps_per_s": self.steps / elapsed,
        }


def peak_memory(device: Any) -> dict[str, float]:
    """This worker's peaks since reset_peaks (or its process's start): its RSS (Linux: VmHWM), and the CUDA memory
    allocated on a GPU."""
    import torch

    peaks = {"peak_rss_mib": _peak_rss_kib() / 1024}
    if device.type == "cuda":
        peaks["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


def _peak_rss_kib() -> float:
    try:  # the high-water mark reset_peaks can reset; ru_maxrss also keeps the peak of threads that have ended
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peaks(device: Any) -> None:
    """Start this process's peaks (peak_memory) afresh: a Tune actor that trains one trial after another
    (jobs/tune_worker.py) reports each trial's own peak, not the largest of the trials before it. The memory
    of the trial before is released first (its CUDA cache included)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the RSS now
    except OSError:
        pass


def next_batches(stream_items: Iterator[Any], step: int, grad_accum: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """(the rows, the tensors) of each of this worker's micro batches of `step`, from the stream."""
    micro, batches = [], []
    for k in range(grad_accum):
        got_step, got_micro, rows, tensors = next(stream_items)
        while got_step < step:  # a restart from an older checkpoint than the driver planned for
            got_step, got_micro, rows, tensors = next(stream_items)
        if (got_step, got_micro) != (step, k):
            raise RuntimeError(f"data stream out of order: expected step {step} micro batch {k}, got {got_step}/{got_micro}")
        micro.append(rows)
        batches.append(tensors)
    return micro, batches


def stop_reason(run_dir: Path, rank: int, parallel: bool, device: Any) -> str | None:
    """Why the driver asked to stop (SIGTERM, Ctrl-C), agreed by every rank after the same step (parallel:
    several workers, or one forced to run their paths)."""
    reason = attempts.stop_request(run_dir) if rank == 0 else None
    if parallel:
        (flag,) = collective.reduce([1.0 if reason else 0.0], device, op="max")
        reason = reason or ("stop requested" if flag else None)
    return reason


def run_eval(training: Training, device: Any, eval_shard: Any, generator: EvalGenerator | None, log: Log, step: int) -> dict[str, Any]:
    """The eval metrics at `step`, on this worker's eval rows (and eval.generate's answers, logged)."""
    batches = (tensors for _, _, _, tensors in stream.micro_batches(eval_shard)) if eval_shard is not None else iter(())
    # DDP: the unwrapped model, whose forward runs no collective (DDP's broadcasts its buffers at every forward,
    # and ranks run different numbers of eval batches); ZeRO-3's forwards gather, so its short ranks get filler
    # batches (jobs/stream.py)
    model = training.core if training.ddp else training.model
    metrics = evaluate(model, batches, device, training.autocast, training.input_dtype, keep=training.keep_logits)
    generated = generator(training, device) if generator else None
    if generated is not None:
        metrics["eval_generated_accuracy"] = generated["accuracy"]
        log({"event": "generations", "step": step, **generated})
    return metrics


def _train(config: dict[str, Any]) -> None:
    # Wall-clock stamps (time.time(): comparable with the driver's on one machine) for the start-up breakdown
    # in the manifest: worker started -> data encoded -> model loaded -> first optimizer step done.
    clock = {"worker_started": time.time()}
    run_worker(config, from_ray(config), clock)


def run_worker(config: dict[str, Any], worker: Worker, clock: dict[str, float] | None = None) -> Training:
    """The loop, for Ray Train's worker (_train) or jobs/local_worker.py's. Returns the trained Training (the
    local runner reads it; Ray's worker drops it)."""
    clock = clock if clock is not None else {"worker_started": time.time()}
    # ---- setup ------------------------------------------------------------------------------------
    job = JobConfig.model_validate(config["job"])
    run_dir = Path(config["run_dir"])
    rank, world, device = worker.rank, worker.world, worker.device
    parallel = world > 1 or worker.force_parallel  # DDP, rayft's collectives and the stop flag run
    collective.force(worker.force_parallel)
    set_up_device(device, job.precision, int(config["cpus_per_worker"]))
    arch = architectures.for_model_dir(job.model_dir)
    t_setup = time.time()

    # The data arrives already encoded (jobs/stream.py: by Ray Data's tasks): this worker's micro batches of the
    # global schedule, in step order, and its share of the eval rows.
    plan = config["data"]
    total_steps, epoch_starts = plan["total_steps"], plan["epoch_starts"]
    train_shard, eval_shard = worker.train_shard, worker.eval_shard
    has_eval = plan["eval_rows"] > 0  # every rank takes part in an eval (it ends in an all-reduce), even one with no rows

    rows_log = run_dir / "rows" / f"rank-{rank}.jsonl"  # which rows each step trained on (exactly-once checks)
    rows_log.parent.mkdir(exist_ok=True)
    previous = fatal_error = None
    attempt = 0  # rank 0 writes the record
    if rank == 0:
        attempts.sweep_staging(job.scaling.staging_dir)  # checkpoint copies of workers killed while writing one
        attempt, previous = previous_attempts(run_dir)
        fatal_error = attempts.fatal(run_dir)
    if fatal_error:  # an error that would repeat: this restart fails at once, without loading the model again
        raise RuntimeError(fatal_error)
    log = Log(run_dir, attempt, writes=rank == 0)
    encode_nodes: set[str] = set()
    # the stream starts now: its first micro batches are read and collated while the model is built
    stream_items = stream.started(stream.micro_batches(train_shard, encode_nodes))
    clock["data_encoded"] = time.time()
    warmup = int(job.train.warmup_ratio * total_steps)
    schedule = partial(lr_lambda, total=total_steps, warmup=warmup, schedule=job.train.schedule)

    ds_config = None
    if job.deepspeed:
        zero.init_comm(device)
        ds_config, changed = zero.ds_config(job, world, gpu=device.type == "cuda")
        if rank == 0:
            zero.write_config(run_dir, ds_config, changed)
    training = build_training(job, arch, device, world, schedule, ds_config, ddp=parallel and not ds_config)
    trainable, total = count_parameters(training.core)

    # ---- restore ----------------------------------------------------------------------------------
    start_step = restore(training, worker.checkpoint)
    checkpoints = Checkpoints(training, job, rank, run_dir, total_steps, last=start_step,
                              kill_at=config.get("kill_in_checkpoint_at") if attempt == 1 else None, send=worker.report)

    node_ids = collective.gather(worker.node_id)  # which Ray nodes the workers landed on (placement: pack | spread)
    log(
        {
            "event": "start",
            "step": start_step,
            # a later attempt (a restart after a lost worker, or --resume) takes over at start_step; steps
            # start_step+1 .. previous_reached were run before by an attempt whose work after its last checkpoint is lost
            "previous_reached": previous,
            "total_steps": total_steps,
            "rows": plan["rows"],
            "zero_stage": job.deepspeed.stage if job.deepspeed else None,
            "dropped_rows": plan["dropped_rows"],
            "validation": plan["validation"],
            # how the micro batches arrive: "direct" (rows encoded once, read from this machine's disk) or "ray_data"
            "stream": "direct" if plan.get("direct") else "ray_data",
            "runner": worker.runner,
            "attention": getattr(getattr(training.core, "config", None), "_attn_implementation", None),  # the kernel that ran
            "trainable_params": trainable,
            # train.lr_groups: each optimizer group's peak rate and parameters (one group at train.lr without it)
            "lr_groups": training.lr_groups,
            "total_params": total,
            "world_size": world,
            "ray_nodes": len(set(node_ids)),
            "device": str(device),
            "setup_s": round(time.time() - t_setup, 2),
            "clock": {**clock, "model_loaded": time.time()},
        }
    )
    # eval.generate: greedy answers on the first eval rows at every eval (ZeRO-3: every rank, else rank 0)
    generator = EvalGenerator(job, arch, rank, zero3=bool(job.deepspeed and job.deepspeed.stage == 3)) if job.eval.generate and has_eval else None
    last_eval: dict[str, Any] = {}
    if start_step == 0 and has_eval and job.eval.at_start:  # the "before" number
        before = run_eval(training, device, eval_shard, generator, log, 0)
        log({"event": "eval", "step": 0, **before})
        last_eval = {**before, "eval_step": 0}
        checkpoints.report({"step": 0, **before}, None)

    # ---- optimizer steps --------------------------------------------------------------------------
    training.model.train()
    memory_logged = preemption_saved = False
    window = Window()
    data_wait_s = 0.0  # time waiting for the stream's next micro batches (the data path's cost to training)
    steps_s = 0.0  # time in optimizer steps (forward, backward, update); evals, reports, checkpoints excluded
    for step in range(start_step, total_steps):
        t_wait = time.time()
        micro, batches = next_batches(stream_items, step, job.train.grad_accum)
        t_step = time.time()
        data_wait_s += t_step - t_wait
        with rows_log.open("a") as f:
            f.write(json.dumps({"step": step + 1, "rows": micro}) + "\n")
        window.count(micro, batches)
        step_loss = optimizer_step(training, batches, device)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"train loss is {step_loss} at step {step + 1}; lower train.lr or use precision: bf16")
        window.add_loss(step_loss)
        t_done = time.time()
        steps_s += t_done - t_step
        if step == start_step:
            log({"event": "first_step", "step": step + 1, "step_s": t_done - t_step, "time": t_done})

        done = step + 1
        if done == config.get("oom_at_step"):
            attempts.hog_memory(done, rank)
        if done == config["fault_at_step"]:
            raise InjectedFault(f"RAYFT_FAULT_AT_STEP={done}: fault injected after step {done}")
        # Ray's preemption notice is a collective through Ray (6.6 ms a call here, 1 worker): asked every log_every steps
        stop, preempted = stop_reason(run_dir, rank, parallel, device), worker.preempted() if done % job.train.log_every == 0 else None
        if (stop or (preempted and not preemption_saved)) and done != checkpoints.last and done != total_steps:
            # a checkpoint of this step now, unless the newest is of it (the last step checkpoints below)
            # with the newest eval's numbers (a search's checkpoint ranking and its scheduler need its metric)
            now = {"step": done, "epoch": round(epoch_of(done, epoch_starts, total_steps), 3), "train_loss": window.mean_loss()}
            checkpoints.report({**last_eval, **now}, done)
        if preempted and not preemption_saved:  # a node is being drained: Ray Train restarts from this checkpoint
            preemption_saved = True
            log({"event": "preemption", "step": done, "nodes": preempted, "checkpoint_step": checkpoints.last})
        if stop and done != total_steps:
            log({"event": "stopped", "step": done, "reason": stop, "checkpoint_step": checkpoints.last})
            return training
        is_last = done == total_steps
        do_eval = has_eval and (done % job.train.eval_every == 0 or is_last)
        do_ckpt = done % job.train.checkpoint_every == 0 or is_last
        if done % job.train.log_every == 0 or do_eval or do_ckpt:
            metrics = window.record(done, round(epoch_of(done, epoch_starts, total_steps), 3), training.scheduler.get_last_lr()[0], world, device)
            metrics.update(peak_memory(device))
            if ds_config and not memory_logged:  # after the first step, when optimizer state exists
                metrics.update(zero.memory_breakdown(training.model, world))
                memory_logged = True
            if do_eval:
                metrics.update(run_eval(training, device, eval_shard, generator, log, done))
                last_eval = {k: v for k, v in metrics.items() if k.startswith("eval_")} | {"eval_step": done}
            log({"event": "eval" if do_eval else "train", **metrics})
            if do_eval or do_ckpt:
                checkpoints.report(metrics, done if do_ckpt else None)
            window = Window()
    log({"event": "end", "step": total_steps, "steps_s": steps_s, "data_wait_s": round(data_wait_s, 3), "encode_nodes": len(encode_nodes), "time": time.time()})
    return training
