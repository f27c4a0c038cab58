"""`rayft plan`'s table: a Comparison (the job and its alternatives, from orchestrator/planner/fit.py) as text,
one row per configuration with its bytes per term, what fits, and the recommendation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.planner.fit import Comparison, change_text, fits, set_flags, split_note
from orchestrator.planner.memory import GiB, four_bit_bytes
from orchestrator.planner.shapes import ModelShape

if TYPE_CHECKING:
    from orchestrator.config import JobConfig

UNITS = {"GiB": GiB, "GB": 10**9, "MiB": 2**20}


def render(c: Comparison, units: str = "GiB") -> str:
    scale = UNITS[units]
    job, shape, budget = c.job, c.shape, c.budget
    n = shape.total_params
    text = shape.text
    from orchestrator import hub

    name = f"{job.model} at {job.model_revision or 'main'}" if hub.is_hub_id(job.model) else shape.name or job.model
    lines = [
        f"model: {name} ({shape.model_type}, {_count(n)} parameters; text {text.hidden} wide x "
        f"{text.layers} layers, vocab {shape.vocab}"
        + (f"; vision {shape.vision.hidden} wide x {shape.vision.layers} layers" if shape.vision else "")
        + ")"
    ]
    where = "per GPU" if budget.device == "gpu" else "per CPU worker"
    available = budget.for_workers(job.scaling.workers)
    shown = "unknown" if available is None else f"{available / scale:.2f} {units}"
    split = split_note(budget, job.scaling.workers)
    lines.append(f"memory {where}: {shown} ({budget.source}{split})")
    lora = f"LoRA rank {job.lora.rank} (dropout {job.lora.dropout}) on " + (
        "the architecture's default targets" if job.lora.targets == "auto" else ", ".join(job.lora.targets)
    )
    lines.append(
        f"assumptions: micro batch {micro_batch_words(job)} (image tokens included), "
        f"precision {job.precision}, gradient checkpointing {'on' if job.train.gradient_checkpointing else 'off'}, {lora}, AdamW"
    )
    storage = [
        ("fp32", n * 4),
        ("bf16/fp16", n * 2),
        ("nf4 (4.5 bits)", _all_4bit(shape, False)),
        ("nf4 + double quant (~4.127 bits)", _all_4bit(shape, True)),
    ]
    lines.append(
        "weights by storage (every parameter): "
        + " | ".join(f"{k} {v / scale:.2f} {units}" for k, v in storage)
    )
    lines.append("")
    header = [
        "configuration",
        "trainable",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "overhead",
        "host",
        "total",
        "fits",
    ]
    table = [header]
    for p in c.rows:
        ok = fits(p, budget)
        table.append(
            [
                p.label,
                f"{_count(p.trainable_params)} ({p.trainable_params / n:.2%})",
                *(
                    f"{b / scale:.2f}"
                    for b in (p.weights, p.gradients, p.optimizer, p.activations, p.overhead)
                ),
                f"{p.offloaded / scale:.2f}" if p.offloaded else "-",
                f"{p.total / scale:.2f}",
                "?" if available is None else ("yes" if ok else "no"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        lines.append(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        f"({units} per {'GPU' if budget.device == 'gpu' else 'worker'}; host: moved to host memory by CPU offload"
        + (", included in the total on CPU workers)" if budget.device == "cpu" else ")")
    )
    lines.append("")
    r = c.recommended
    if available is None:
        lines.append("recommendation: none (memory available is unknown; pass --gpu-mem)")
    elif r is None:
        lines.append("recommendation: nothing rayft knows fits; use a larger device or more workers (--gpus)")
    elif not r.overrides:
        lines.append(
            f"recommendation: the job as it is ({r.total / scale:.2f} of {available / scale:.2f} {units})"
        )
    else:
        lines.append(
            f"recommendation: {r.label}: set {change_text(r.overrides)} ({r.total / scale:.2f} {units} predicted)"
        )
        lines.append(f"  {set_flags(r.overrides)}")
    return "\n".join(lines)


def _all_4bit(shape: ModelShape, double_quant: bool) -> int:
    """Every parameter in 4-bit, as a reference point (qlora keeps embeddings, lm_head and vision in 16 bits)."""
    return four_bit_bytes(shape.total_params, double_quant)


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


def micro_batch_words(job: JobConfig) -> str:
    if job.data.batching in ("tokens", "packed") and job.data.batch_tokens is not None:
        return f"of {job.data.batch_tokens} {'packed' if job.data.batching == 'packed' else 'padded'} tokens"
    return f"{job.train.micro_batch_size} x {job.data.max_length} tokens"
