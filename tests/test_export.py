"""`rayft merge` on a trained run, as a user runs it: the exported files get the modes the umask gives any
other file (safetensors alone would leave them 0600), and a failed export leaves the previous model/ as it
was plus one model.partial, which the next merge removes.

Each test exports a copy of the quickstart's QLoRA run (the session fixture the training tests share), so
no training happens here beyond that fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import RAYFT

pytestmark = pytest.mark.slow


def run_copy(quickstart_run: dict, tmp_path: Path) -> Path:
    source = Path(quickstart_run["merged_model"]).parent
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir, symlinks=True)
    return run_dir


def merge(run_dir: Path, umask: int = 0o022, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`rayft merge RUN_DIR` under a umask and, optionally, a file-size limit (RLIMIT_FSIZE: writing past it
    fails with EFBIG, as on a full quota; Python ignores SIGXFSZ, so the write raises instead of killing)."""

    def limits() -> None:
        os.umask(umask)
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([RAYFT, "merge", str(run_dir)], capture_output=True, text=True, timeout=300, preexec_fn=limits)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def model_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("model"))


def test_exported_files_are_readable_by_others_under_umask_022(quickstart_run, tmp_path):
    run_dir = run_copy(quickstart_run, tmp_path)
    proc = merge(run_dir, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = modes(run_dir / "model")
    assert any(name.endswith(".safetensors") for name in found)
    wrong = {n: oct(m) for n, m in found.items() if m != (0o755 if (run_dir / "model" / n).is_dir() else 0o644)}
    assert not wrong
    assert model_dirs(run_dir) == ["model"]


def test_failed_export_keeps_the_old_model_and_the_next_merge_cleans_up(quickstart_run, tmp_path):
    run_dir = run_copy(quickstart_run, tmp_path)
    before, manifest = digests(run_dir / "model"), (run_dir / "manifest.json").read_text()
    weights = max(p.stat().st_size for p in (run_dir / "model").glob("*.safetensors"))
    assert weights > 64 << 10  # the limit below stops the weights, not the config written before them

    failed = merge(run_dir, max_file_bytes=64 << 10)
    assert failed.returncode == 1 and "export failed" in failed.stderr, failed.stderr[-3000:]
    assert model_dirs(run_dir) == ["model", "model.partial"]  # one clearly named leftover, never .partial.partial
    assert (run_dir / "model.partial" / "config.json").is_file()  # it failed mid-write, not before it
    assert digests(run_dir / "model") == before
    assert (run_dir / "manifest.json").read_text() == manifest

    # the next merge removes the leftover and succeeds; its modes follow the umask (here 027), not a constant
    proc = merge(run_dir, umask=0o027)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "partial" not in proc.stdout + proc.stderr
    assert model_dirs(run_dir) == ["model"]
    found = modes(run_dir / "model")
    wrong = {n: oct(m) for n, m in found.items() if m != (0o750 if (run_dir / "model" / n).is_dir() else 0o640)}
    assert not wrong
    assert json.loads((run_dir / "manifest.json").read_text())["parity"]["passed"]


def test_an_export_starts_by_removing_earlier_leftovers(tmp_path):
    """Including the model.partial.partial that earlier versions left (they wrote beside twice over)."""
    from jobs.merge import partial_dir

    for name in ("model.partial", "model.partial.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert partial_dir(tmp_path / "model") == tmp_path / "model.partial"
    assert list(tmp_path.iterdir()) == []


def test_the_logits_checks_memory_guard_counts_its_logits_and_a_tied_embedding_once():
    """At Qwen's 151,646-token vocabulary the fp32 logits the end-to-end check holds outweigh a small model:
    the guard counts them (every parity batch's for two models, one batch's three more), and the model's fp32
    size counts a tied embedding and head once."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jobs.export_stream import fp32_size
    from jobs.merge import PARITY_BATCHES, end_to_end_bytes, logits_bound, logits_bytes
    from orchestrator.config import build_job

    vocab = 151_646
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = vocab * 32 * 4
    assert embedding < fp32_size(model) < 2 * embedding  # once, not twice
    batches = [{"input_ids": torch.zeros(8, 329, dtype=torch.long)}] * 2  # two micro batches of 8 rows of up to 329 tokens
    one = 8 * 329 * vocab * 4  # 1.6 GB
    assert logits_bytes(batches, vocab) == 2 * 2 * one + 3 * one
    assert end_to_end_bytes(fp32_size(model), logits_bytes(batches, vocab)) > 7 * one > 2.8 * fp32_size(model)
    # export.on: worker asks Ray for the check's memory before any row is read: the bound covers the most rows it reads
    job = build_job({"model": "7B", "data": {"train": "x.jsonl", "max_length": 329}, "train": {"micro_batch_size": 8}}, local_files=False)[0]
    most = [{"input_ids": torch.zeros(8, 329, dtype=torch.long)}] * PARITY_BATCHES
    assert logits_bound(job, vocab) == logits_bytes(most, vocab) >= logits_bytes(batches, vocab)
