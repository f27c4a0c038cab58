"""The GPU check: rayft's GPU paths in one short run that prints ONE JSON line (the last line of stdout).

    bash bench/gpu_check.sh            # on a lent GPU machine (installs the carried wheels first; docs/benchmarks.md)
    python bench/gpu_check.py --tiny   # the same checks on the CPU at tiny sizes (tests/test_gpu_check.py, in `make test`)

It runs without Ray (the lent machine has none): the training worker's own loop through jobs/local_worker.py, under
a real torch.distributed process group of one rank (NCCL on the GPU, gloo on the CPU) with the multi-worker paths
forced on (DDP wrap, rayft's collectives, the stop flag). The checks (bench/gpu_checks.py), each timed and in its
own try/except, so that one failure does not hide the others' numbers:

  bnb_roundtrip           NF4/FP4 (double quant on/off) quantized on the GPU and on the CPU: bit-equal or not
  worker_qlora            the worker path of a QLoRA run: steps, eval, generation, checkpoints, a restore from
                          the half-way checkpoint, the export (merge + parity); the trained 4-bit weights against
                          the export's CPU round trip of the same base weights
  planner_memory          a random-init 7B-shaped Llama in bf16 on the GPU, LoRA steps with and without gradient
                          checkpointing: the planner's prediction against max_memory_reserved and NVML
  gradient_checkpointing  the same steps with and without it: equal losses, lower peak memory
  fp16_loss_scaling       QLoRA FP4 in fp16 with the GradScaler
  fp32_tf32               LoRA in fp32: TF32 matmuls on after the worker's set-up (on CUDA only)
  qwen2_vl, idefics3      tiny VLMs of those architectures, QLoRA on the worker path
  zero3, zero2_offload    DeepSpeed ZeRO-3 (with its export) and ZeRO-2 with the optimizer offloaded to the CPU

The GPU sizes are meant to finish in under 6 minutes on one H100 (a shared LLaVA of hidden 256, 4 layers, 40
steps; the 7B only for the planner; not yet run on a GPU); --tiny (hidden 32, 1 layer, 2-4 steps) takes ~20 s on
2 CPU cores. Checks that would start past --budget are skipped, and a watchdog prints the line with what finished
and exits if one hangs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate", "pydantic", "safetensors", "tokenizers", "pyarrow")


def facts(device: Any) -> dict[str, Any]:
    """The machine and the stack the checks ran on, and the torch build `make setup` would choose there."""
    import torch

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
                           "cuda": torch.version.cuda, "python": platform.python_version(), "env": os.environ.get("RAYFT_GPU_CHECK_ENV", sys.prefix)}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out["versions"] = versions
    out["ray_importable"] = importlib.util.find_spec("ray") is not None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   nccl=str(torch.cuda.nccl.version()), bf16=torch.cuda.is_bf16_supported())
    try:  # what scripts/choose_torch.py (make setup) picks for this machine's driver
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "choose_torch.py"), "2.13.0"], capture_output=True, text=True, timeout=60)
        out["torch_choice"] = {"pip_args": proc.stdout.strip(), "said": proc.stderr.strip().removeprefix("set-up: ")}
    except (OSError, subprocess.SubprocessError) as e:
        out["torch_choice"] = f"{type(e).__name__}: {e}"
    return out


def build_shared(sizes: Any, work: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny LLaVA most checks share and the colour task's data."""
    from orchestrator import tinymodels

    model = tinymodels.build_tiny_llava(work / "llava", hidden=sizes.hidden, layers=sizes.layers)
    data = tinymodels.write_colour_data(work / "data", "english", sizes.rows, sizes.eval_rows)
    return model, data


class Watchdog:
    """If a check hangs (an NCCL collective that never completes), print the line with what finished and exit."""

    def __init__(self, result: dict[str, Any], deadline: float, out: Any):
        self.result, self.deadline, self.out, self.running = result, deadline, out, ""
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while time.time() < self.deadline:
            time.sleep(1)
        self.result["checks"][self.running or "?"] = {"ok": False, "error": "still running at the watchdog's deadline (--budget); the process was stopped"}
        self.result["total_s"] = round(time.time() - self.result.pop("_t0"), 1)
        print(json.dumps(self.result, default=str), file=self.out, flush=True)
        os._exit(3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (what `make test` runs)")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--budget", type=float, default=None, help="seconds: later checks are skipped past it, a hung one stopped 60 s after (default 270 GPU, 900 --tiny)")
    ap.add_argument("--work", default=None, help="working directory (default: a new temporary one, removed at the end)")
    args = ap.parse_args()
    t0 = time.time()
    stdout = sys.stdout  # the one JSON line; everything else goes to stderr
    result: dict[str, Any] = {"_t0": t0, "checks": {}}
    budget = args.budget or (900 if args.tiny else 270)
    watchdog = Watchdog(result, t0 + budget + 60, stdout)

    with contextlib.redirect_stdout(sys.stderr):
        import gpu_checks
        import torch

        from jobs import local_worker

        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        cuda = torch.cuda.is_available() and not args.tiny
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        result["gpu_check"] = facts(device)
        result["gpu_check"]["sizes"] = "tiny" if args.tiny else "gpu"
        if not cuda and not args.tiny:
            result["error"] = "no CUDA device: run with --tiny on a CPU"
            result["total_s"] = round(time.time() - result.pop("_t0"), 1)
            print(json.dumps(result), file=stdout, flush=True)
            return 1
        result["gpu_check"]["process_group"] = local_worker.process_group(device)
        sizes = gpu_checks.TINY if args.tiny else gpu_checks.GPU
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rayft-gpu-check-"))
        t_build = time.time()
        model, data = build_shared(sizes, work)
        result["gpu_check"]["build_s"] = round(time.time() - t_build, 1)
        setup = gpu_checks.Setup(device, sizes, work, model, data)
        wanted = [c for c in args.only.split(",") if c]
        for check in gpu_checks.CHECKS:
            name = check.__name__
            if wanted and name not in wanted:
                continue
            if time.time() - t0 > budget:
                result["checks"][name] = {"ok": False, "error": f"skipped: the budget of {budget:.0f} s was spent"}
                continue
            watchdog.running = name
            t_check = time.time()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                row = {"ok": True, **check(setup)}
            except Exception as e:  # one check's failure must not hide the others' numbers
                traceback.print_exc()
                row = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
            row["wall_s"] = round(time.time() - t_check, 1)
            result["checks"][name] = row
            print(f"gpu_check: {name}: {json.dumps(row, default=str)}", file=sys.stderr, flush=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        watchdog.running = "teardown"
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
        if not args.work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    result["ok"] = all(row["ok"] for row in result["checks"].values())
    result["total_s"] = round(time.time() - result.pop("_t0"), 1)
    print(json.dumps(result, default=str), file=stdout, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    if "--tiny" in sys.argv:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on the CPU (gloo), as the tests run it
    sys.exit(main())
