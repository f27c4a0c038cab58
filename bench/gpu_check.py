"""The GPU paths in one short run (bench/gpu_check.sh calls it on a lent GPU machine; under 8 minutes).

    python bench/gpu_check.py [--hidden 1024 --layers 24 --steps 30]

Builds a LLaVA-style VLM from config (SigLIP vision + Qwen2 text; ~0.5B parameters at the defaults) and
the colour task, then runs `rayft train` (the real CLI, on an embedded local Ray, one GPU) for:
qlora-nf4 and qlora-fp4 (bitsandbytes 4-bit on CUDA), lora, full, and full under ZeRO-3 (DeepSpeed over
NCCL, one GPU). For each: tokens/s, MFU (6 x parameters x tokens/s over the measured bf16 matmul peak;
for adapters the 6N convention overstates the work, so it is labelled `mfu_6n`), torch.cuda
max_memory_allocated against the planner's prediction, eval accuracy. Prints ONE JSON line at the end.
On a machine without a GPU it runs the same paths on CPU (use --hidden 64 --layers 2 --steps 4 there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = {
    "qlora-nf4": {"method": "qlora", "quantization": {"type": "nf4", "double_quant": True}},
    "qlora-fp4": {"method": "qlora", "quantization": {"type": "fp4", "double_quant": False}},
    "lora": {"method": "lora"},
    "full": {"method": "full"},
    "full-zero3": {"method": "full", "deepspeed": {"stage": 3}},
}


def matmul_peak(dtype_name: str, size: int, device: str) -> float:
    """FLOP/s of the best of a few square matmuls."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * size**3 / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--timeout", type=int, default=150, help="seconds per method")
    args = ap.parse_args()

    import torch

    from orchestrator import planner, tinymodels
    from orchestrator.config import load_job

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    facts = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda}
    if cuda:
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    size = 8192 if cuda else 1024
    peak = {"bf16": matmul_peak("bfloat16", size, device), "fp32": matmul_peak("float32", size, device)}
    facts["matmul_peak_tflops"] = {k: round(v / 1e12, 2) for k, v in peak.items()}

    work = Path(tempfile.mkdtemp(prefix="rayft-gpu-check-"))
    t0 = time.time()
    model_dir = tinymodels.build_tiny_llava(work / "model", hidden=args.hidden, layers=args.layers)
    data = tinymodels.write_colour_data(work / "data", "english", 64 * args.batch, 64)
    shape = planner.load_shape(str(model_dir))
    facts["params"] = shape.total_params
    facts["build_s"] = round(time.time() - t0, 1)

    results = {}
    rayft = str(Path(sys.executable).with_name("rayft"))
    for name in args.methods.split(","):
        body = {
            "name": f"gpu-{name}",
            "model": str(model_dir),
            "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 64},
            "precision": "bf16",
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
            "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": 1e-4 if "full" in name else 1e-3,
                      "eval_every": args.steps, "checkpoint_every": args.steps, "log_every": 5},
            "scaling": {"workers": 1, "gpu": "on" if cuda else "off"},
            "output": str(work / "runs"),
            **METHODS[name],
        }
        job_path = work / f"{name}.yaml"
        job_path.write_text(yaml.safe_dump(body))
        row: dict = {}
        try:
            job, _ = load_job(job_path)
            predicted = planner.plan(job, shape, "gpu" if cuda else "cpu")
            row["predicted_states_mib"] = round(predicted.states / 2**20)
            row["predicted_total_mib"] = round(predicted.total / 2**20)
            t1 = time.time()
            proc = subprocess.run([rayft, "train", str(job_path), "--json", "--no-progress"], capture_output=True, text=True, timeout=args.timeout)
            row["wall_s"] = round(time.time() - t1, 1)
            if proc.returncode != 0:
                row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]
            else:
                manifest = json.loads(proc.stdout[proc.stdout.index("{\n") :])
                from jobs.metrics_log import read_metrics

                records = read_metrics(Path(manifest["run_dir"]))
                tokens_per_s = manifest["metrics"]["tokens_per_s"]
                row.update(
                    tokens_per_s=round(tokens_per_s),
                    steps_per_s=round(manifest["metrics"]["steps_per_s"], 2),
                    eval_accuracy=manifest["metrics"]["eval_accuracy"],
                    trainable_params=manifest["trainable_params"],
                    mfu_6n=round(6 * shape.total_params * tokens_per_s / peak["bf16"], 4),
                    parity=manifest["parity"]["passed"],
                )
                cuda_peak = max((r.get("cuda_peak_mib", 0) for r in records), default=0)
                if cuda_peak:
                    row["cuda_peak_mib"] = round(cuda_peak)
                    row["predicted_over_measured"] = round(row["predicted_total_mib"] / cuda_peak, 2)
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {args.timeout}s"
        except Exception as e:  # one method's failure must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        results[name] = row
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    print(json.dumps({"gpu_check": facts, "methods": results, "total_s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
