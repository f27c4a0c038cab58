"""The controller stays light: `rayft --help` and `rayft validate` import no torch/ray.train/transformers."""

import subprocess
import sys
import time

from conftest import RAYFT


def test_controller_imports_nothing_heavy():
    code = (
        "import sys, orchestrator.cli, orchestrator.config, orchestrator.architectures, orchestrator.launch, orchestrator.planner, orchestrator.schema_doc\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'bitsandbytes', 'ray', 'peft', 'mlflow', 'wandb', 'tensorboardX') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_instant():
    t0 = time.time()
    out = subprocess.run([RAYFT, "--help"], capture_output=True, text=True, check=True)
    assert time.time() - t0 < 3.0
    for command in ("quickstart", "validate", "train", "merge", "plan", "schema"):
        assert command in out.stdout


def test_schema_is_instant():
    t0 = time.time()
    out = subprocess.run([RAYFT, "schema", "--markdown"], capture_output=True, text=True, check=True)
    assert time.time() - t0 < 3.0
    assert out.stdout.startswith("# Job file reference")
