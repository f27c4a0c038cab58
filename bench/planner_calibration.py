"""The memory planner against measurement: weights + gradients + optimizer state, activations, peak RSS.

    export TORCH_EXTENSIONS_DIR=.venv/torch_extensions   # DeepSpeed's prebuilt CPU ops (make setup)
    scripts/netns.sh .venv/bin/python bench/planner_calibration.py [--steps 2]

Two LLaVA-style VLMs built from config (SigLIP + Qwen2, random weights): the quickstart's tiny one (205k
parameters) and a 57.2M one (hidden 640, 8 layers, as bench/zero_memory.py), micro batch 8, bf16.

- full / lora / qlora-nf4 on one process (each in a fresh interpreter, so its peak RSS is its own), through
  the workers' own code (jobs.model.build_model, AdamW, autocast): weights are the parameters' storage
  (4-bit weights packed, plus absmax / nested quantization state), gradients every .grad after backward,
  optimizer every AdamW state tensor after the step; activations are the tensors autograd saved in one
  forward (saved_tensors_hooks, each storage once, parameters excluded).
- full under ZeRO-1/2/3 over 2 Ray Train workers (launch.train, 1 core each): rank 0's parameters and
  optimizer state measured from the live tensors after the first step, gradients computed
  (jobs.zero.memory_breakdown: DeepSpeed frees them after each step), peak RSS per worker.

Predictions are `planner.plan(job, ...)` on a CPU worker, with data.max_length set to the batch's padded
length (what the activations actually see). Results: bench/results/planner_calibration.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
MODELS = {"tiny": {"hidden": 64, "layers": 2}, "50M": {"hidden": 640, "layers": 8}}
SINGLE = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "quantization": {"type": "none"}},
    "qlora-nf4": {"method": "qlora", "quantization": {"type": "nf4", "double_quant": True}},
}
MICRO_BATCH = 8


def job_raw(model_dir: Path, data: dict[str, Path], out: Path, **changes: Any) -> dict[str, Any]:
    raw = {
        "name": "calibration",
        "model": str(model_dir),
        "data": {"train": str(data["train"]), "max_length": 64},
        "method": "full",
        "lora": {"rank": 16, "dropout": 0.05},
        "precision": "bf16",
        "train": {
            "max_steps": 2,
            "micro_batch_size": MICRO_BATCH,
            "lr": 1e-4,
            "log_every": 1,
            "eval_every": 10_000,
            "checkpoint_every": 10_000,
        },
        "output": str(out),
    }
    return {**raw, **changes}


def predicted(job: Any, padded: int) -> dict[str, int]:
    from orchestrator import planner

    at_batch = job.model_copy(update={"data": job.data.model_copy(update={"max_length": padded})})
    p = planner.plan(at_batch, planner.load_shape(job.model), "cpu")
    return {
        "states": p.states,
        "activations": p.activations,
        "total": p.total,
        "total_params": p.total_params,
    }


@contextlib.contextmanager
def saved_tensors(exclude: set[int]) -> Iterator[dict[int, int]]:
    """{storage pointer: bytes} of every tensor autograd saves for backward inside the block."""
    import torch

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def measure_one(raw: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step (two) in this process, as a Ray Train worker runs it."""
    import torch

    from jobs import data as data_mod
    from jobs.model import build_model, load_processor, parameter_bytes, torch_dtype
    from orchestrator import architectures
    from orchestrator.config import build_job

    torch.set_num_threads(os.cpu_count() or 1)
    job, _ = build_job(raw)
    arch = architectures.for_model_dir(job.model)
    processor = load_processor(job.model, arch)
    rows, _ = data_mod.encode_rows(job.data.train, job.data, processor, True, list(range(MICRO_BATCH)))
    batch = data_mod.collate(rows, processor.tokenizer.pad_token_id)
    padded = int(batch["input_ids"].shape[1])
    model = build_model(job, arch, torch.device("cpu"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.train.lr)
    autocast = torch.autocast("cpu", dtype=torch_dtype(job.precision), enabled=job.precision != "fp32")
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out: dict[str, Any] = {}
    for step in range(2):
        with saved_tensors(exclude=param_storages) as saved, autocast:
            loss = model(**batch).loss
        loss.backward()
        if step == 0:
            out["activations"] = sum(saved.values())
            out["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["weights"] = parameter_bytes(model)
    out["optimizer"] = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.numel() > 1
    )
    out["states"] = out["weights"] + out["grads"] + out["optimizer"]
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["predicted"] = predicted(job, padded)
    out["padded_length"] = padded
    return out


def measure_zero(raw: dict[str, Any], stage: int, runs: Path) -> dict[str, Any]:
    from jobs.metrics_log import read_metrics
    from orchestrator.config import build_job
    from orchestrator.launch import train

    job, _ = build_job(
        {
            **raw,
            "deepspeed": {"stage": stage},
            "scaling": {"workers": 2, "cpus_per_worker": 1},
            "output": str(runs),
        }
    )
    run_dir = train(job, progress=False).run_dir  # raises RunFailed with the workers' error
    records = read_metrics(run_dir)
    first = next(r for r in records if "params_bytes" in r)
    states = first["params_bytes"] + first["grads_bytes"] + first["optimizer_bytes"]
    peak = max(r["peak_rss_mib"] for r in records if "peak_rss_mib" in r) * MIB
    return {
        "states": states,
        "weights": first["params_bytes"],
        "grads": first["grads_bytes"],
        "optimizer": first["optimizer_bytes"],
        "activations": None,
        "peak_rss": peak,
        "predicted": predicted(job, raw["data"]["max_length"]),
        "padded_length": None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one single-process config (JSON job)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return

    import ray

    from orchestrator import launch, tinymodels

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    work = Path(tempfile.mkdtemp(prefix="rayft-calibration-"))
    data = tinymodels.write_colour_data(work / "data", "english", 64, 8)
    rows: list[dict[str, Any]] = []
    dirs = {
        name: tinymodels.build_tiny_llava(work / name, **shape)
        for name, shape in MODELS.items()
        if name in args.models
    }
    for name, model_dir in dirs.items():
        for method, changes in SINGLE.items():
            raw = job_raw(model_dir, data, work / "runs", **changes)
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(raw)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{name} {method} failed:\n{proc.stderr[-3000:]}")
            rows.append(
                {
                    "model": name,
                    "config": f"{method}, 1 process",
                    **json.loads(proc.stdout.strip().splitlines()[-1]),
                }
            )
            print(f"measured {name} {method}", file=sys.stderr, flush=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for name, model_dir in dirs.items():
            for stage in args.stages:
                raw = job_raw(model_dir, data, work / "runs")
                rows.append(
                    {
                        "model": name,
                        "config": f"full, ZeRO-{stage} x2 (rank 0)",
                        **measure_zero(raw, stage, work / "runs"),
                    }
                )
                print(f"measured {name} ZeRO-{stage}", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    for r in rows:
        r["ratio"] = r["predicted"]["states"] / r["states"]
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    result = {
        "micro_batch_size": MICRO_BATCH,
        "precision": "bf16",
        "lora_rank": 16,
        "versions": launch.versions(),
        "rows": rows,
    }
    (REPO / "bench" / "results" / "planner_calibration.json").write_text(json.dumps(result, indent=2))
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | config | predicted W+G+O MiB | measured MiB | ratio | predicted activations MiB | saved activations MiB | predicted total MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted"]
        act = "-" if r["activations"] is None else f"{r['activations'] / MIB:.1f}"
        lines.append(
            f"| {r['model']} | {r['config']} | {p['states'] / MIB:.2f} | {r['states'] / MIB:.2f} | {r['ratio']:.3f} | "
            f"{p['activations'] / MIB:.1f} | {act} | {p['total'] / MIB:.0f} | {r['peak_rss'] / MIB:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
