"""Per-worker memory (parameters, gradients, optimizer state) and step time of ZeRO stages 0-3 at 2 workers.

    scripts/netns.sh .venv/bin/python bench/zero_memory.py [--hidden 640 --layers 8 --steps 8]

A ~50M-parameter LLaVA-style VLM (SigLIP + Qwen2) is built from config with random weights; each stage
trains it for a few steps on the colour data in bf16 (micro batch 8 per worker, 1 core per worker).
Parameters and optimizer state are measured from the live tensors on rank 0 after the first step;
gradients are computed (DeepSpeed frees them after each step). Results: bench/results/zero_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def main() -> None:
    import ray

    from orchestrator import launch, tinymodels
    from orchestrator.config import build_job

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(tempfile.mkdtemp(prefix="rayft-zero-bench-"))
    model_dir = tinymodels.build_tiny_llava(work / "model", hidden=args.hidden, layers=args.layers)
    data = tinymodels.write_colour_data(work / "data", "english", 256, 32)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = {}
    for stage in args.stages:
        raw = {
            "name": f"zero{stage}",
            "model": str(model_dir),
            "method": "full",
            "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 64},
            "precision": "bf16",
            "train": {"max_steps": args.steps, "micro_batch_size": 8, "lr": 1e-4, "log_every": 1, "eval_every": 10_000, "checkpoint_every": 10_000},
            "scaling": {"workers": 2, "cpus_per_worker": 1},
            "deepspeed": {"stage": stage},
            "output": str(work / "runs"),
        }
        job, _ = build_job(raw)
        out = launch.train(job, progress=False)
        from jobs.metrics_log import read_metrics

        records = read_metrics(out.run_dir)
        train = [r for r in records if "steps_per_s" in r]
        first = next(r for r in train if "params_bytes" in r)
        rows[stage] = {
            "params_mib": first["params_bytes"] / MIB,
            "grads_mib": first["grads_bytes"] / MIB,
            "optimizer_mib": first["optimizer_bytes"] / MIB,
            "total_mib": (first["params_bytes"] + first["grads_bytes"] + first["optimizer_bytes"]) / MIB,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in train),
            "step_s": statistics.median(1 / r["steps_per_s"] for r in train[2:] or train),
            "total_params": out.manifest["total_params"],
        }
    ray.shutdown()
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    result = {"workers": 2, "precision": "bf16", "micro_batch_size": 8, "versions": launch.versions(), "stages": rows}
    (REPO / "bench" / "results" / "zero_memory.json").write_text(json.dumps(result, indent=2))
    n = next(iter(rows.values()))["total_params"]
    ref = rows.get(0, next(iter(rows.values())))["total_mib"]
    print(f"model: {n / 1e6:.1f}M parameters, 2 workers, bf16, per-worker MiB (rank 0)")
    print("| stage | params | grads | optimizer | total | vs stage 0 | peak RSS | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, r in rows.items():
        print(
            f"| {stage} | {r['params_mib']:.0f} | {r['grads_mib']:.0f} | {r['optimizer_mib']:.0f} | {r['total_mib']:.0f} "
            f"| {r['total_mib'] / ref:.2f} | {r['peak_rss_mib']:.0f} | {r['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
