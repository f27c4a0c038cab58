"""What every benchmark shares: machine facts, alternating contenders (A B A B ...), medians and ratios,
and bench/results/<name>.json. `bench/report.py` turns the results into the README's table.

A benchmark module calls:

    rows = alternate({"rayft": run_a, "hf": run_b}, rounds=3)      # each run_x() -> dict of numbers
    write_result("hf_compare", {"contenders": rows, ...}, summary=[...])

`summary` is a list of rows for the README table: {"benchmark", "measure", "rayft", "baseline", "ratio", "note"}.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def machine() -> dict[str, Any]:
    """Cores, CPU model and the flags that matter for these numbers, memory, library versions, date."""
    flags: list[str] = []
    model = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in have if f.startswith(("avx512", "avx2", "amx", "fma")))
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "ray", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    gpu = None
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" or Path("/dev/nvidia0").exists():
        try:
            import torch

            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:
            gpu = None
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "cpu_flags": flags,
        "memory_bytes": mem,
        "gpu": gpu,
        "versions": versions,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def alternate(contenders: dict[str, Callable[[], dict[str, float]]], rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Run the contenders in turn, `rounds` times (A B A B ...: a noisy machine slows both, not one);
    returns, per contender, every round's numbers and the median of each."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for i in range(rounds):
        for name, run in contenders.items():
            t0 = time.time()
            out = run()
            out.setdefault("wall_s", time.time() - t0)
            runs[name].append(out)
            print(f"  round {i + 1}/{rounds} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, int | float)), flush=True)
    return {name: {"runs": r, "median": medians(r)} for name, r in runs.items()}


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in runs[0] if all(isinstance(r.get(k), int | float) for r in runs)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def write_result(name: str, result: dict[str, Any], summary: list[dict[str, Any]] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"name": name, "machine": machine(), **result}
    if summary is not None:
        body["summary"] = summary
    path.write_text(json.dumps(body, indent=2, default=str))
    print(f"wrote {path.relative_to(REPO)}")
    return path
