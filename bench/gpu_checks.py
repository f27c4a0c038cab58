"""The checks of bench/gpu_check.py, one function each: (Setup) -> the numbers it reports. A check raises where
a path broke (its error is reported, and the next check runs); what it measured it returns.

Every check runs on the GPU with the default sizes and on the CPU with --tiny (the same code; NCCL becomes gloo,
CUDA's memory counters are absent). Nothing here imports ray: the worker path is jobs/local_worker.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import collective, local_worker
from jobs.metrics_log import read_metrics
from orchestrator import architectures, tinymodels
from orchestrator.config import JobConfig, build_job


@dataclass(frozen=True)
class Sizes:
    hidden: int
    """The shared tiny LLaVA's width (text and vision) and depth."""
    layers: int
    rows: int
    eval_rows: int
    batch: int
    steps: int
    """The QLoRA worker run's steps (checkpoints at half and at the end)."""
    short: int
    """Steps of every other run."""
    lr: float
    vlm_hidden: int
    """Qwen2-VL's and Idefics3's width."""
    planner: dict[str, Any]
    """The planner check's model config (a 7B Llama's shape on the GPU)."""
    planner_batch: int
    planner_length: int
    roundtrip: tuple[int, int]
    """The 4-bit round trip's weight shape."""


LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000}  # orchestrator/planner/shapes.py: SIZES["7B"]
TINY = Sizes(hidden=32, layers=1, rows=64, eval_rows=8, batch=8, steps=4, short=2, lr=1e-2, vlm_hidden=32,
             planner={**LLAMA_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 4, "vocab_size": 512},
             planner_batch=1, planner_length=64, roundtrip=(64, 256))
GPU = Sizes(hidden=256, layers=4, rows=640, eval_rows=64, batch=16, steps=40, short=8, lr=2e-3, vlm_hidden=64,
            planner=LLAMA_7B, planner_batch=2, planner_length=512, roundtrip=(4096, 4096))


@dataclass
class Setup:
    device: Any
    sizes: Sizes
    work: Path
    model: Path
    """The shared tiny LLaVA."""
    data: dict[str, Path]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def colour_job(s: Setup, name: str, **sections: Any) -> JobConfig:
    """A job on the colour task (the shared LLaVA unless `model` is given), validated as `rayft train` does."""
    raw: dict[str, Any] = {
        "name": name, "model": str(s.model), "method": "lora", "precision": "bf16", "output": str(s.work / "runs"),
        "data": {"train": str(s.data["train"]), "eval": str(s.data["eval"]), "max_length": 64},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "scaling": {"gpu": "auto"},
    }
    train = {"max_steps": s.sizes.short, "micro_batch_size": s.sizes.batch, "lr": s.sizes.lr, "warmup_ratio": 0.0,
             "eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 1, **sections.pop("train", {})}
    job, _ = build_job({**raw, **sections, "train": train, "quantization": sections.get("quantization", {"type": "none"})})
    return job


def cuda_peaks(s: Setup) -> dict[str, float]:
    """The CUDA caching allocator's peaks since the last reset (MiB); nothing on CPU."""
    import torch

    if not s.cuda:
        return {}
    return {"cuda_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "cuda_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def nvml_memory(s: Setup) -> dict[str, float]:
    """This process's GPU memory as NVML sees it (CUDA context and the allocator's cache included; MiB), and the
    whole device's used memory. In a container NVML may list the process under another pid: with one process
    listed, that one is taken."""
    import os

    if not s.cuda:
        return {}
    try:
        import pynvml
    except ImportError:
        return {"nvml": "pynvml (nvidia-ml-py) is not installed"}
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid()] or ([procs[0].usedGpuMemory] if len(procs) == 1 else [])
    out = {"nvml_device_used_mib": round(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20, 1)}
    if mine and mine[0] is not None:
        out["nvml_process_mib"] = round(mine[0] / 2**20, 1)
    return out


def run_numbers(run: local_worker.LocalRun) -> dict[str, Any]:
    """What a local run's reports and metrics.jsonl say: train losses, eval losses, rate, what ran distributed."""
    everything = read_metrics(run.run_dir)
    attempt = max(r.get("attempt", 0) for r in everything)
    records = [r for r in everything if r.get("attempt") == attempt]  # this run's (a resumed one's, in the same run_dir)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    end = next(r for r in records if r.get("event") == "end")
    start = next(r for r in records if r.get("event") == "start")
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"train losses {losses}")
    steps = end["step"] - start["step"]
    t = run.training
    return {
        "start_step": start["step"], "steps": steps, "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "steps_per_s": round(steps / max(end["steps_s"], 1e-9), 2),
        "wrapped": type(t.model).__name__ if t else None, "collectives_run": collective.active(),
    }


def evals(run: local_worker.LocalRun) -> list[dict[str, Any]]:
    return [r for r in run.reports if "eval_loss" in r]


# ---- the checks ----------------------------------------------------------------------------------------


def worker_qlora(s: Setup) -> dict[str, Any]:
    """The worker path of a QLoRA run (NF4, double quant): set-up, steps with the eval before and at half and
    end, generation, checkpoints at half and end; then a second attempt restored from the half-way checkpoint
    to the end; then the export (streamed merge, layer and end-to-end parity)."""
    from jobs.merge import export

    n = s.sizes.steps
    job = colour_job(s, "qlora", method="qlora", quantization={"type": "nf4", "double_quant": True},
                     train={"max_steps": n, "eval_every": n // 2, "checkpoint_every": n // 2},
                     eval={"at_start": True, "generate": {"samples": 2, "max_new_tokens": 4}}, export={"dtype": "fp32"})
    run_dir = s.work / "runs" / "qlora"
    first = local_worker.run(job, run_dir, s.device)
    out = run_numbers(first) | cuda_peaks(s) | nvml_memory(s)
    e = evals(first)
    out.update(loss_before=e[0]["eval_loss"], loss_after=e[-1]["eval_loss"], accuracy_after=e[-1]["eval_accuracy"],
               generated_accuracy=e[-1].get("eval_generated_accuracy"), checkpoints=sorted(first.checkpoints))
    out["export_roundtrip_vs_trained"] = trained_vs_export_roundtrip(job, first.training.core)
    first.training = None
    second = local_worker.run(job, run_dir, s.device, resume=first.checkpoints[n // 2])
    resumed = run_numbers(second)
    if resumed["start_step"] != n // 2:
        raise AssertionError(f"restored at step {resumed['start_step']}, the checkpoint is of step {n // 2}")
    out.update(restored_at=resumed["start_step"], resumed_loss_after=evals(second)[-1]["eval_loss"],
               resumed_loss_diff=abs(evals(second)[-1]["eval_loss"] - out["loss_after"]))
    second.training = None
    record = export(job, second.checkpoints[n], run_dir / "model")
    checks = record["checks"]
    out["export"] = {"passed": record["passed"], "export_s": record["export_s"], "layers_max_rel_diff": checks["layers"].get("max_rel_diff"),
                     "end_to_end_ran": checks["end_to_end"]["ran"], "end_to_end_max_abs_logit_diff": checks["end_to_end"].get("max_abs_logit_diff"),
                     "merged_accuracy": record.get("merged_accuracy")}
    return out


def trained_vs_export_roundtrip(job: JobConfig, core: Any) -> dict[str, Any]:
    """Every 4-bit weight as training held it (bitsandbytes quantized it on the training device: CUDA on the
    GPU), dequantized, against the export's round trip of the same base weight (jobs/export_stream.py:
    as_trained, on the CPU): how many are bit-equal, and the largest difference."""
    import torch
    from safetensors import safe_open

    from jobs.export_stream import as_trained, read_layout
    from jobs.merge import dequantized_state

    layout = read_layout(job, architectures.for_model_dir(job.model))
    trained = dequantized_state(core.get_base_model())
    equal = total = 0
    worst = 0.0
    for name, keys in layout.files:
        with safe_open(str(Path(job.model_dir) / name), "pt") as f:
            for key in keys:
                model_key = layout.to_model[key]
                if model_key not in layout.quantized:
                    continue
                export_side = as_trained(f.get_tensor(key), model_key, job, layout)
                training_side = trained[model_key].cpu()
                total += 1
                equal += bool(torch.equal(export_side, training_side))
                worst = max(worst, float((export_side - training_side).abs().max()))
    if total == 0:
        raise AssertionError("no 4-bit weight found to compare")
    return {"weights": total, "bit_equal": equal, "max_abs_diff": worst}


def fp16_loss_scaling(s: Setup) -> dict[str, Any]:
    """QLoRA over an FP4 base (no double quant) in fp16: autocast with the GradScaler's dynamic loss scale."""
    job = colour_job(s, "fp16", method="qlora", quantization={"type": "fp4", "double_quant": False}, precision="fp16")
    run = local_worker.run(job, s.work / "runs" / "fp16", s.device)
    scaler = run.training.scaler
    return run_numbers(run) | {"scaler_enabled": scaler.is_enabled(), "loss_scale": scaler.get_scale() if scaler.is_enabled() else None} | cuda_peaks(s)


def fp32_tf32(s: Setup) -> dict[str, Any]:
    """LoRA in fp32: the worker's set-up turns TF32 matmuls on where the device is CUDA (and leaves the CPU's alone)."""
    import torch

    job = colour_job(s, "fp32", method="lora", precision="fp32")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        run = local_worker.run(job, s.work / "runs" / "fp32", s.device)
        on = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    if on["tf32_matmul"] != s.cuda:
        raise AssertionError(f"TF32 matmuls {'off' if s.cuda else 'on'} after an fp32 run's set-up on {s.device}")
    return run_numbers(run) | on | {"tf32_expected": s.cuda}


def gradient_checkpointing(s: Setup) -> dict[str, Any]:
    """The same LoRA steps on the same micro batches with and without gradient checkpointing (jobs/train_loop.py's
    build_training and optimizer_step): the losses agree, the activation memory falls."""
    import torch

    from jobs import stream
    from jobs.driver import DATA_CACHE
    from jobs.train_loop import build_training, optimizer_step

    out: dict[str, Any] = {}
    losses = {}
    for on in (False, True):
        job = colour_job(s, f"gc-{on}", method="lora", train={"gradient_checkpointing": on})
        _, train, _ = local_worker.shards(job, s.work / "runs" / DATA_CACHE)
        batches = [tensors for _, _, _, tensors in stream.micro_batches(train)]
        if s.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        training = build_training(job, architectures.for_model_dir(job.model), s.device, 1, lambda step: 1.0, None)
        losses[on] = [optimizer_step(training, [b], s.device) for b in batches]
        enabled = any(getattr(m, "gradient_checkpointing", False) for m in training.core.modules())
        if enabled != on:
            raise AssertionError(f"gradient checkpointing {'off' if on else 'on'} in a run that set it {on}")
        out["with" if on else "without"] = {"losses": losses[on], **cuda_peaks(s)}
        del training
    out["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True))
    if s.cuda:
        out["peak_allocated_ratio"] = round(out["with"]["cuda_peak_allocated_mib"] / out["without"]["cuda_peak_allocated_mib"], 3)
    return out


def zero2_offload(s: Setup) -> dict[str, Any]:
    """Full fine-tuning under DeepSpeed ZeRO-2 with the optimizer offloaded to the CPU (DeepSpeedCPUAdam, its op
    JIT-built on first use), a checkpoint at the end."""
    job = colour_job(s, "zero2", method="full", deepspeed={"stage": 2, "offload_optimizer": "cpu"},
                     train={"lr": 1e-3, "checkpoint_every": s.sizes.short})
    run = local_worker.run(job, s.work / "runs" / "zero2", s.device)
    engine = run.training.model
    master = getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or []
    memory = next((r for r in read_metrics(run.run_dir) if "optimizer_bytes" in r), {})
    return run_numbers(run) | cuda_peaks(s) | {
        "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer).__name__,
        "fp32_master_on": master[0].device.type if master else None,
        "optimizer_bytes": memory.get("optimizer_bytes"), "params_bytes": memory.get("params_bytes"),
        "checkpoints": sorted(run.checkpoints),
    }


def zero3(s: Setup) -> dict[str, Any]:
    """Full fine-tuning under DeepSpeed ZeRO-3 (every rank's partition loaded inside zero.Init), eval with
    generation (synced_gpus), a checkpoint at the end, and its export (consolidation + reload)."""
    from jobs.merge import export

    job = colour_job(s, "zero3", method="full", deepspeed={"stage": 3},
                     train={"lr": 1e-3, "checkpoint_every": s.sizes.short, "eval_every": s.sizes.short},
                     eval={"at_start": True, "generate": {"samples": 2, "max_new_tokens": 4}})
    run = local_worker.run(job, s.work / "runs" / "zero3", s.device)
    partitioned = sum(1 for p in run.training.core.parameters() if hasattr(p, "ds_numel"))
    e = evals(run)
    out = run_numbers(run) | cuda_peaks(s) | {"partitioned_params": partitioned, "loss_before": e[0]["eval_loss"], "loss_after": e[-1]["eval_loss"],
                                              "generated_accuracy": e[-1].get("eval_generated_accuracy")}
    run.training = None
    record = export(job, run.checkpoints[s.sizes.short], run.run_dir / "model")
    out["export"] = {"passed": record["passed"], "merge": record["merge"], "reload_ran": record["checks"].get("reload", {}).get("ran")}
    return out


def vlm(arch: str) -> Any:
    """A check of a QLoRA run of a tiny `arch` (qwen2_vl or idefics3) on the worker path: eval before and after, generation."""

    def check(s: Setup) -> dict[str, Any]:
        model = tinymodels.TINY_VLMS[arch](s.work / arch, hidden=s.sizes.vlm_hidden, layers=1 if s.sizes is TINY else 2)
        job = colour_job(s, arch, model=str(model), method="qlora", quantization={"type": "nf4", "double_quant": True},
                         train={"eval_every": s.sizes.short}, eval={"at_start": True, "generate": {"samples": 2, "max_new_tokens": 4}})
        run = local_worker.run(job, s.work / "runs" / arch, s.device)
        e = evals(run)
        return run_numbers(run) | cuda_peaks(s) | {"loss_before": e[0]["eval_loss"], "loss_after": e[-1]["eval_loss"],
                                                   "generated_accuracy": e[-1].get("eval_generated_accuracy")}

    check.__name__ = arch
    return check


def bnb_roundtrip(s: Setup) -> dict[str, Any]:
    """The same bf16 weights quantized to NF4 and FP4 (double quant on and off) by bitsandbytes on the training
    device and on the CPU (CPU twice under --tiny): packed bytes and absmax (with its nested state) bit-equal or
    not, the largest difference of the dequantized weights, and whether the export's own round trip
    (jobs/export_stream.py: roundtrip_4bit, on the CPU) equals dequant(quant(W)) made on the device."""
    import bitsandbytes as bnb
    import torch

    from jobs.export_stream import roundtrip_4bit

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(*s.sizes.roundtrip, generator=generator) * 0.02
    w[::97, ::89] *= 40  # outliers: blocks whose absmax is far from the rest
    w = w.to(torch.bfloat16)
    other = s.device if s.cuda else torch.device("cpu")

    def quantize(x: Any, qtype: str, nested: bool) -> tuple[Any, Any]:  # as transformers' loader has Params4bit quantize
        return bnb.functional.quantize_4bit(x.contiguous(), blocksize=64, compress_statistics=nested, quant_type=qtype, quant_storage=torch.uint8)

    out: dict[str, Any] = {"compared": f"cpu vs {other.type}", "shape": list(w.shape)}
    for qtype in ("nf4", "fp4"):
        for nested in (True, False):
            p_cpu, st_cpu = quantize(w, qtype, nested)
            p_dev, st_dev = quantize(w.to(other), qtype, nested)
            stats = [(st_cpu.absmax, st_dev.absmax)]
            if nested:
                stats += [(st_cpu.state2.absmax, st_dev.state2.absmax), (st_cpu.offset, st_dev.offset)]
            deq_cpu = bnb.functional.dequantize_4bit(p_cpu, st_cpu).float()
            deq_dev = bnb.functional.dequantize_4bit(p_dev, st_dev).float().cpu()
            job = JobConfig.model_validate({"model": "x", "data": {"train": "x.parquet"}, "method": "qlora", "precision": "bf16",
                                            "quantization": {"type": qtype, "double_quant": nested}})
            out[f"{qtype}{'_dq' if nested else ''}"] = {
                "packed_bit_equal": bool(torch.equal(p_cpu, p_dev.cpu())),
                "packed_bytes_differing": int((p_cpu != p_dev.cpu()).sum()),
                "absmax_bit_equal": all(bool(torch.equal(a, b.cpu())) for a, b in stats),
                "dequantized_max_abs_diff": float((deq_cpu - deq_dev).abs().max()),
                "export_roundtrip_bit_equal": bool(torch.equal(roundtrip_4bit(w, job), deq_dev)),
            }
    return out


def planner_memory(s: Setup) -> dict[str, Any]:
    """The memory planner against the allocator and NVML: a randomly initialised model of the planner check's
    shape (a 7B Llama on the GPU) built in bf16 directly on the device, LoRA attached by rayft, two optimizer
    steps with and without gradient checkpointing; the planner's prediction for each against
    torch.cuda.max_memory_reserved (plus the CUDA context the planner counts) and NVML's process memory."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jobs.model import attach_lora, keep_adapter_inputs
    from jobs.train_loop import build_training, optimizer_step
    from orchestrator import planner
    from orchestrator.planner.memory import CUDA_CONTEXT

    folder = s.work / "planner-model"
    AutoConfig.for_model(**s.sizes.planner).save_pretrained(folder)  # config.json only: the planner's input
    arch = architectures.for_model_dir(folder)
    shape = planner.load_shape(str(folder))
    b, length = s.sizes.planner_batch, s.sizes.planner_length

    def job_for(checkpointing: bool) -> JobConfig:
        return JobConfig.model_validate({"model": str(folder), "data": {"train": str(s.data["train"]), "max_length": length}, "method": "lora",
                                         "precision": "bf16", "quantization": {"type": "none"},
                                         "train": {"micro_batch_size": b, "gradient_checkpointing": checkpointing, "lr": 1e-4}})

    t0 = time.time()
    with torch.device(s.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    model = attach_lora(model, job_for(False), arch)
    keep_adapter_inputs(model)
    out: dict[str, Any] = {"model": shape.name, "params": shape.total_params, "tokens_per_step": b * length, "build_s": round(time.time() - t0, 1)}
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, shape.vocab, (b, length), generator=generator)), "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
               for _ in range(2)]
    for checkpointing in (False, True):
        job = job_for(checkpointing)
        base = model.get_base_model()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        predicted = planner.plan(job, shape, "gpu" if s.cuda else "cpu")
        if s.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        training = build_training(job, arch, s.device, 1, lambda step: 1.0, None, ddp=False, model=model)
        losses = [optimizer_step(training, [batch], s.device) for batch in batches]
        if not all(math.isfinite(x) for x in losses):
            raise FloatingPointError(f"losses {losses}")
        row: dict[str, Any] = {"losses": losses, "predicted_mib": round(predicted.total / 2**20),
                               "predicted": {k: round(getattr(predicted, k) / 2**20) for k in ("weights", "gradients", "optimizer", "activations", "overhead")}}
        if s.cuda:
            torch.cuda.synchronize()
            row |= cuda_peaks(s) | nvml_memory(s)
            row["predicted_over_reserved"] = round((predicted.total - CUDA_CONTEXT) / 2**20 / row["cuda_peak_reserved_mib"], 3)
            if "nvml_process_mib" in row:
                row["predicted_over_nvml"] = round(predicted.total / 2**20 / row["nvml_process_mib"], 3)
        out["checkpointing" if checkpointing else "plain"] = row
        del training
    return out


CHECKS = [bnb_roundtrip, worker_qlora, planner_memory, gradient_checkpointing, fp16_loss_scaling, fp32_tf32,
          vlm("qwen2_vl"), vlm("idefics3"), zero3, zero2_offload]
"""In the order they run: the cheap and the most telling first, ZeRO-2's offload (a JIT build of CPU Adam) last."""
