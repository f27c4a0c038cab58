"""How much of the machine a full fine-tuning step uses: bf16 and fp32 matmul peak, and achieved FLOP/s.

    .venv/bin/python bench/hardware.py [--size 4096 --reps 5 --steps 6]

Peak: square `size` x `size` matmuls with torch at all cores (2 n^3 FLOP each), best of `reps` after one
warm-up, bf16 and fp32 alternated over `rounds`. Achieved (median of 2 runs): a full fine-tuning step of bench/hf_compare.py's ~51M-parameter VLM (bf16 autocast, micro
batch 8) run through rayft's own step (the in-process contender of hf_compare, fresh subprocess), counted as
6 x parameters x tokens per step (forward 2, backward 4; attention's sequence-quadratic terms, ~1% at these
29-token rows, are left out) over the measured step time, as a fraction of the bf16 peak.
Results: bench/results/hardware.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import alternate, write_result


def matmul_peak(dtype_name: str, size: int, reps: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"tflops": 2 * size**3 / best / 1e12, "best_s": best}


def main() -> None:
    import hf_compare

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="bf16, fp32 alternated this many times; the best counts")
    ap.add_argument("--steps", type=int, default=6, help="timed full fine-tuning steps (after 2 warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    # These machines share their cores with neighbours: one dtype's whole measurement can land in a slow
    # stretch (a 4096^2 bf16 matmul here ran at 88 and at 158 GFLOP/s minutes apart). So the dtypes alternate
    # over --rounds and the best of every round counts.
    peaks: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for dtype in ("bf16", "fp32"):
            m = matmul_peak(dtype, args.size, args.reps)
            if dtype not in peaks or m["tflops"] > peaks[dtype]["tflops"]:
                peaks[dtype] = m
            print(f"{dtype} matmul {args.size}^2: {m['tflops'] * 1e3:.0f} GFLOP/s (best {m['best_s']:.3f} s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="rayft-hardware-"))
    model_dir, data = hf_compare.build_material(work)
    params = hf_compare.count_params(model_dir)
    raw = hf_compare.job_raw("full", model_dir, data, args.warmup + args.steps, work / "runs")
    step = alternate({"rayft full": lambda: hf_compare.child("rayft", raw, args.warmup)}, rounds=2)["rayft full"]["median"]
    tokens_per_step = step["tokens_per_s"] * step["step_s"]
    achieved = 6 * params * step["tokens_per_s"]
    bf16_peak, fp32_peak = peaks["bf16"]["tflops"] * 1e12, peaks["fp32"]["tflops"] * 1e12
    result = {
        "matmul": {"size": args.size, "reps": args.reps, "rounds": args.rounds, "threads": os.cpu_count(), **{k: v for k, v in peaks.items()}},
        "full_finetune": {
            "params": params,
            "tokens_per_step": tokens_per_step,
            "step_s": step["step_s"],
            "flop_per_step": 6 * params * tokens_per_step,
            "achieved_tflops": achieved / 1e12,
            "fraction_of_bf16_peak": achieved / bf16_peak,
            "fraction_of_fp32_peak": achieved / fp32_peak,
            "steps": args.steps,
            "warmup": args.warmup,
        },
    }
    note = f"torch.mm {args.size}^2, {os.cpu_count()} threads, best of {args.reps} x {args.rounds} rounds"
    summary = [
        {"benchmark": "hardware efficiency", "measure": "bf16 matmul peak GFLOP/s", "rayft": None, "baseline": round(bf16_peak / 1e9, 1), "ratio": None, "note": note},
        {"benchmark": "hardware efficiency", "measure": "fp32 matmul peak GFLOP/s", "rayft": None, "baseline": round(fp32_peak / 1e9, 1), "ratio": None, "note": note},
        {
            "benchmark": "hardware efficiency",
            "measure": "full fine-tuning GFLOP/s (6 x params x tokens) vs bf16 peak",
            "rayft": round(achieved / 1e9, 1),
            "baseline": round(bf16_peak / 1e9, 1),
            "ratio": round(achieved / bf16_peak, 3),
            "note": f"{params / 1e6:.0f}M VLM, batch 8, {tokens_per_step:.0f} tokens/step, bf16 autocast",
        },
    ]
    write_result("hardware", result, summary=summary)
    print("| measure | GFLOP/s | fraction of bf16 peak |")
    print("|---|---|---|")
    print(f"| bf16 matmul peak ({args.size}^2) | {bf16_peak / 1e9:.0f} | 1.00 |")
    print(f"| fp32 matmul peak ({args.size}^2) | {fp32_peak / 1e9:.0f} | {fp32_peak / bf16_peak:.2f} |")
    print(
        f"| full fine-tuning, {params / 1e6:.0f}M VLM, {tokens_per_step:.0f} tokens/step, {step['step_s']:.2f} s/step "
        f"| {achieved / 1e9:.0f} | {achieved / bf16_peak:.3f} |"
    )


if __name__ == "__main__":
    main()
