"""Fixtures: tiny models and data built from configs (no hub), and one local Ray for the session.

Ray-using tests expect to run inside the private network namespace that `make test` sets up
(scripts/netns.sh): only loopback exists, and every Ray process dies with the run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the tests run on CPU; no accelerator auto-detection warning
# A Hugging Face cache of the tests' own (hub_model writes models into it in the hub client's layout), never the
# user's; set before anything imports huggingface_hub, which reads it once
HF_HOME = tempfile.mkdtemp(prefix="rayft-test-hf-")
os.environ["HF_HOME"] = HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(HF_HOME, "hub")
atexit.register(shutil.rmtree, HF_HOME, True)
HUB_COMMIT = "4c1f0a9e8d7b6c5a4f3e2d1c0b9a8f7e6d5c4b3a"

REPO = Path(__file__).resolve().parent.parent
RAYFT = str(Path(sys.executable).parent / "rayft")
CHANCE = 1 / 8  # eight colours


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """The quickstart's material (tiny LLaVA init, English and French colour data, job files), untrained."""
    from orchestrator import quickstart

    root = tmp_path_factory.mktemp("world")
    quickstart.build(root)
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process training tests (launch.train reuses it and leaves it up)."""
    import ray

    # as launch.ensure_local_ray: the cores for the training workers, as many again for Ray Data's tasks
    cores = os.cpu_count() or 2
    ray.init(address="local", num_cpus=2 * cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> dict:
    """`rayft quickstart DIR` exactly as a user runs it; its trained base serves the adapter tests."""
    import json
    import time

    root = tmp_path_factory.mktemp("quickstart")
    t0 = time.time()
    proc = subprocess.run([RAYFT, "quickstart", str(root), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    summary["root"] = root
    summary["cli_wall_s"] = time.time() - t0
    return summary


def cache_hub_model(repo: str, files: Path, commit: str = HUB_COMMIT) -> Path:
    """`files` as hub model `repo` at `commit`, the `main` branch pointing at it, in the tests' Hugging Face cache:
    the layout huggingface_hub writes and reads (models--org--name/snapshots/<commit>/, refs/main)."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    if not snapshot.exists():
        shutil.copytree(files, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def run_clean_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter where peft and bitsandbytes cannot be imported."""
    prelude = "import sys\nsys.modules['peft'] = None\nsys.modules['bitsandbytes'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout)


def clean_reload_accuracy(model_dir: Path, eval_file: str) -> float:
    """Accuracy of an exported model loaded by plain transformers where peft/bitsandbytes cannot import."""
    code = f"""
import json, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from jobs.data import encode_rows, collate
from jobs.evaluate import answer_stats
from orchestrator.config import DataConfig
model = AutoModelForImageTextToText.from_pretrained({str(model_dir)!r}, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained({str(model_dir)!r})
assert getattr(model.config, "quantization_config", None) is None
cfg = DataConfig(train={eval_file!r}, max_length=64)
rows, _ = encode_rows(cfg.train, cfg, processor, True)
correct = count = 0
with torch.no_grad():
    for i in range(0, len(rows), 32):
        batch = collate(rows[i:i+32], processor.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        _, _, c, n = answer_stats(model(**batch).logits, labels)
        correct, count = correct + c, count + n
print(json.dumps({{"accuracy": correct / count}}))
"""
    proc = run_clean_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["accuracy"]
