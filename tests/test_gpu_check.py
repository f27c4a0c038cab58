"""The GPU check (bench/gpu_check.py) at its CPU sizes, so that it cannot rot between the rare runs on a lent GPU
machine: every check passes where Ray cannot even be imported (the lent machine has none), and its numbers say
what each path did. Plus the one GPU set-up rule a CPU can check: fp32 runs turn TF32 on on CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

CHECKS = ("bnb_roundtrip", "worker_qlora", "planner_memory", "gradient_checkpointing", "fp16_loss_scaling", "fp32_tf32", "qwen2_vl", "idefics3",
          "zero3", "zero2_offload")
NO_RAY = "import runpy, sys\nsys.modules['ray'] = None\nsys.argv = ['bench/gpu_check.py', '--tiny']\nrunpy.run_path('bench/gpu_check.py', run_name='__main__')\n"


@pytest.fixture(scope="module")
def tiny() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    out = json.loads(lines[-1])
    assert len(lines) == 1, f"stdout holds more than the JSON line: {lines[:-1]}"
    assert proc.returncode == 0 and out["ok"], json.dumps({k: v for k, v in out["checks"].items() if not v["ok"]}) + proc.stderr[-4000:]
    return out


def test_every_check_runs_on_the_cpu_without_ray(tiny):
    assert sorted(tiny["checks"]) == sorted(CHECKS)
    assert all(row["ok"] and row["wall_s"] >= 0 for row in tiny["checks"].values())
    facts = tiny["gpu_check"]
    assert facts["ray_importable"] is False and facts["process_group"] == "gloo" and facts["sizes"] == "tiny"
    assert facts["versions"]["bitsandbytes"] and facts["versions"]["deepspeed"] and "CPU build" in facts["torch_choice"]["said"]


def test_the_worker_path_trains_restores_and_exports(tiny):
    """One QLoRA run on jobs/local_worker.py: DDP and the collectives forced on at world size 1, loss falling,
    a second attempt restored from the half-way checkpoint reaching the same loss, and the export's parity."""
    run = tiny["checks"]["worker_qlora"]
    assert run["wrapped"] == "DistributedDataParallel" and run["collectives_run"]
    assert math.isfinite(run["loss_before"]) and run["loss_after"] < run["loss_before"] - 0.05
    assert run["train_loss_last"] < run["train_loss_first"]
    assert run["checkpoints"] == [run["steps"] // 2, run["steps"]] and run["restored_at"] == run["steps"] // 2
    assert run["resumed_loss_diff"] < 1e-4  # the CPU is deterministic: the restored run retraces the first
    assert run["export"]["passed"] and run["export"]["end_to_end_ran"] and run["export"]["end_to_end_max_abs_logit_diff"] < 1e-3
    trained = run["export_roundtrip_vs_trained"]
    assert trained["weights"] > 0 and trained["bit_equal"] == trained["weights"]


def test_precision_deepspeed_and_architecture_checks_say_what_ran(tiny):
    c = tiny["checks"]
    for name in ("nf4_dq", "nf4", "fp4_dq", "fp4"):  # CPU against CPU under --tiny: the path runs
        assert c["bnb_roundtrip"][name]["packed_bit_equal"] and c["bnb_roundtrip"][name]["export_roundtrip_bit_equal"]
    assert c["gradient_checkpointing"]["max_loss_diff"] < 1e-5
    assert c["fp16_loss_scaling"]["scaler_enabled"] and c["fp16_loss_scaling"]["loss_scale"] > 1
    assert c["fp32_tf32"]["tf32_matmul"] is False and c["fp32_tf32"]["tf32_expected"] is False  # a CPU run leaves it alone
    for arch in ("qwen2_vl", "idefics3"):
        assert c[arch]["loss_after"] < c[arch]["loss_before"] and c[arch]["wrapped"] == "DistributedDataParallel"
    assert c["zero3"]["wrapped"] == "DeepSpeedEngine" and c["zero3"]["partitioned_params"] > 0 and c["zero3"]["export"]["passed"]
    assert c["zero2_offload"]["optimizer"] == "DeepSpeedCPUAdam" and c["zero2_offload"]["fp32_master_on"] == "cpu"
    for row in (c["planner_memory"]["plain"], c["planner_memory"]["checkpointing"]):
        assert row["predicted_mib"] > 0 and all(math.isfinite(x) for x in row["losses"])


@pytest.mark.parametrize(("device", "precision", "expected"), [("cuda", "fp32", True), ("cuda", "bf16", False), ("cpu", "fp32", False)])
def test_an_fp32_run_on_cuda_computes_its_matmuls_in_tf32(monkeypatch, device, precision, expected):
    """torch leaves fp32 matmuls in full fp32 on Ampere and later (8x slower than TF32 on an H100); the worker's
    set-up turns TF32 on for an fp32 run on CUDA. CUDA is made to look present: only the flags are read."""
    from jobs.train_loop import set_up_device

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        set_up_device(torch.device(device, 0) if device == "cuda" else torch.device("cpu"), precision, torch.get_num_threads())
        assert torch.backends.cuda.matmul.allow_tf32 is expected
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
