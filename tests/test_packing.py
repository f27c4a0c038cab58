"""data.batching: packed on every architecture rayft supports: one packed sequence gives each row the loss, the
gradients and the eval answers of the same rows unpacked (padded, with an attention mask)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jobs.batching import build_schedule, eval_batches
from jobs.data import IGNORE_INDEX, collate, encode_rows, pad_token_id
from jobs.evaluate import answer_logits, evaluate
from jobs.model import build_model, load_processor
from orchestrator import tinymodels
from orchestrator.architectures import for_model_dir
from orchestrator.config import DataConfig, JobConfig
from tests.test_multiarch import non_square, one_thread  # noqa: F401 (one_thread: its autouse fixture, one torch thread)

BUILDERS = {
    "llava": tinymodels.build_tiny_llava,
    "idefics3": lambda out: tinymodels.build_tiny_idefics3(out, image_splitting=True),  # crops per row differ
    "qwen2_vl": tinymodels.build_tiny_qwen2_vl,
    "qwen2_5_vl": lambda out: tinymodels.build_tiny_qwen2_vl(out, version="qwen2_5_vl"),
    "paligemma": tinymodels.build_tiny_paligemma,
    "llama": lambda out: tinymodels.build_tiny_text(out, arch="llama"),
    "qwen2": lambda out: tinymodels.build_tiny_text(out, arch="qwen2"),
}


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of three lengths (the english, french and shape questions), the first image 64x32 (fewer Qwen2-VL
    patches and Idefics3 crops than the others)."""
    rows = tinymodels.colour_rows(2, seed=5) + tinymodels.colour_rows(2, task="french", seed=6) + tinymodels.colour_rows(1, task="shape", seed=7)
    return tinymodels.write_parquet(non_square(rows), tmp_path_factory.mktemp("rows") / "rows.parquet")


def token_losses(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(each answer token's loss, in row order, its row): the head at the answer positions only."""
    batch = dict(batch)
    labels = batch.pop("labels")
    logits, targets, rows = answer_logits(model, batch, labels, keep=True)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none"), rows


def per_row(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed answer-token loss, the sum of all)."""
    loss, rows = token_losses(model, batch)
    return torch.zeros(int(rows.max()) + 1).index_add(0, rows, loss), loss.sum()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_packed_micro_batch_gives_each_row_its_unpacked_loss_gradients_and_eval_answers(name: str, rows_file: Path, tmp_path: Path) -> None:
    tinymodels.qwen2_vl_image_processor_class()
    path = BUILDERS[name](tmp_path / name)
    arch = for_model_dir(path)
    assert arch.name == name
    processor = load_processor(str(path), arch)
    examples, _ = encode_rows(rows_file, DataConfig(train=str(rows_file)), processor, arch.kind == "vlm")
    assert len({len(e.input_ids) for e in examples}) >= 2  # rows of different lengths
    pad = pad_token_id(processor)
    torch.manual_seed(0)
    model = build_model(JobConfig.model_validate({"model": str(path), "data": {"train": str(rows_file)}, "method": "full", "precision": "fp32"}),
                        arch, torch.device("cpu"))
    model.train()

    padded = collate(examples, pad)
    packed = collate(examples, pad, packed_from=arch.first_position)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples)) and "attention_mask" not in packed

    unpacked_rows, unpacked_sum = per_row(model, padded)
    unpacked_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    packed_rows, packed_sum = per_row(model, packed)
    packed_sum.backward()
    assert torch.allclose(packed_rows, unpacked_rows, rtol=1e-5, atol=1e-5), (packed_rows, unpacked_rows)
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-5) for n, p in model.named_parameters() if n in grads)

    with torch.no_grad():  # the control: positions that run on across rows (one long row) give other losses
        run_on = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None] + arch.first_position}
        assert not torch.allclose(token_losses(model, run_on)[0], token_losses(model, packed)[0], rtol=1e-5, atol=1e-5)

    got = evaluate(model, [packed], torch.device("cpu"), torch.no_grad, keep=True)
    want = evaluate(model, [padded], torch.device("cpu"), torch.no_grad, keep=True)
    assert got["eval_examples"] == want["eval_examples"] == len(examples)
    assert got["eval_accuracy"] == want["eval_accuracy"] and math.isclose(got["eval_loss"], want["eval_loss"], rel_tol=1e-5)


def test_packed_micro_batches_fill_the_token_budget_without_padding() -> None:
    """Every row once per epoch, each micro batch at most batch_tokens tokens, and nearly full: rows of 25-400 tokens
    packed into 2,048-token micro batches leave under 5% of each unused (length_grouped would pad ~10-40%)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(25, 401, size=2000)
    rows = np.arange(len(lengths))
    data = DataConfig(train="x.parquet", batching="packed", batch_tokens=2048)
    train = JobConfig.model_validate({"model": "m", "data": {"train": "x.parquet"}, "train": {"epochs": 1, "micro_batch_size": 1}}).train
    schedule = build_schedule(rows, lengths, train, data, world=2)
    micro = [part for step in schedule.steps for gm in step for part in gm]
    sums = [int(lengths[m].sum()) for m in micro]
    assert max(sums) <= 2048
    seen = np.concatenate(micro)
    assert len(seen) == len(set(seen.tolist())) and len(seen) > 0.95 * len(rows)
    assert sum(sums) / (2048 * len(micro)) > 0.95
    evals = eval_batches(rows, lengths, data, 1, rank=0, world=2)
    assert sorted(np.concatenate(evals).tolist()) == list(range(0, 2000, 2)) and all(int(lengths[b].sum()) <= 2048 for b in evals)


def test_packed_labels_never_predict_the_next_rows_first_token(rows_file: Path, tmp_path: Path) -> None:
    path = tinymodels.build_tiny_text(tmp_path / "llama")
    arch = for_model_dir(path)
    processor = load_processor(str(path), arch)
    examples, _ = encode_rows(rows_file, DataConfig(train=str(rows_file)), processor, False)
    packed = collate(examples, pad_token_id(processor), packed_from=0)
    starts = np.cumsum([0] + [len(e.input_ids) for e in examples[:-1]])
    assert (packed["position_ids"][0, starts] == 0).all()
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)
