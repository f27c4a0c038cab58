"""The generic data path and model path on every VLM family of the matrix besides LLaVA (tested elsewhere).

Each architecture is built tiny from its config with a locally built tokenizer and processor, saved with
save_pretrained, and loaded back through `jobs.model.load_processor` / `build_model` exactly as a user's
checkpoint directory is: AutoProcessor and AutoModelForImageTextToText pick the classes from the files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.data import IGNORE_INDEX, Encoded, collate, encode_rows, read_table
from jobs.model import build_model, load_processor
from orchestrator import tinymodels
from orchestrator.architectures import for_model_dir
from orchestrator.config import DataConfig, JobConfig

ARCHS = ["idefics3", "qwen2_vl", "paligemma"]
# Image tokens per 64x64 image: Idefics3 (32/8)^2 patches pixel-shuffled by 2 -> 4; Qwen2-VL 32x32 with
# 8-pixel patches merged 2x2 -> 4; PaliGemma one token per SigLIP patch -> 16.
IMAGE_TOKENS = {"idefics3": 4, "qwen2_vl": 4, "paligemma": 16}
ROWS = 4
STEPS = 25


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Matrices this small gain nothing from a second thread, and lose several-fold when another process
    holds the cores (measured: 30 s for this file with 2 threads against 12 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodels.write_parquet(tinymodels.colour_rows(ROWS, seed=5), tmp_path_factory.mktemp("rows") / "rows.parquet")


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory per architecture, as save_pretrained writes a real one."""
    return tinymodels.TINY_VLMS[request.param](tmp_path_factory.mktemp(request.param))


def encode(path: Path, rows_file: Path) -> tuple[list[Encoded], Any]:
    """The rows encoded with the directory's own processor, loaded as training loads it."""
    tinymodels.qwen2_vl_image_processor_class()  # registers the image-only Qwen2-VL processor (no torchvision)
    arch = for_model_dir(path)
    processor = load_processor(str(path), arch)
    examples, dropped = encode_rows(rows_file, DataConfig(train=str(rows_file)), processor, arch.kind == "vlm")
    assert not dropped
    return examples, processor


def test_batch_has_image_tokens_and_loss_on_the_answer_only(tiny: Path, rows_file: Path) -> None:
    name = for_model_dir(tiny).name
    examples, processor = encode(tiny, rows_file)
    tok = processor.tokenizer
    for e, row in zip(examples, read_table(rows_file).to_pylist(), strict=True):
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(answer)
        assert e.labels[-n:].tolist() == answer == e.input_ids[-n:].tolist()
        assert bool((e.labels[:-n] == IGNORE_INDEX).all())
        is_image = e.input_ids == processor.image_token_id
        assert int(is_image.sum()) == IMAGE_TOKENS[name]
        if "token_type_ids" in e.extras:  # PaliGemma: 0 on the bidirectional prefix, 1 on the causal answer
            assert e.extras["token_type_ids"].tolist() == [0] * (len(e.input_ids) - n) + [1] * n
        if "mm_token_type_ids" in e.extras:  # Qwen2-VL: 1 on image tokens, 0 on text (the answer included)
            assert e.extras["mm_token_type_ids"].tolist() == is_image.long().tolist()

    batch = collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == ROWS * IMAGE_TOKENS[name]
    assert "pixel_values" in batch


def non_square(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make the first image 64x32: Idefics3 then gets fewer crops, Qwen2-VL fewer patches and tokens."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(rows[0]["image"])).crop((0, 0, 64, 32)).save(buf, format="PNG")
    return [{**rows[0], "image": buf.getvalue()}, *rows[1:]]


MIXED_SIZES = {
    "idefics3": lambda out: tinymodels.build_tiny_idefics3(out, image_splitting=True),
    "qwen2_vl": tinymodels.build_tiny_qwen2_vl,
    "paligemma": tinymodels.build_tiny_paligemma,
}


@pytest.mark.parametrize("name", list(MIXED_SIZES))
def test_differently_shaped_images_batch_like_single_rows(name: str, tmp_path: Path) -> None:
    """Padding (of tokens, and of Idefics3's crops) must not change what the model computes for a row."""
    from transformers import AutoModelForImageTextToText

    path = MIXED_SIZES[name](tmp_path / name)
    data = tinymodels.write_parquet(non_square(tinymodels.colour_rows(2, seed=7)), tmp_path / "mixed.parquet")
    examples, processor = encode(path, data)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        together = model(**collate(examples, pad)).logits
        for j, e in enumerate(examples):
            alone = model(**collate([e], pad)).logits[0]
            assert torch.allclose(together[j, : len(e.input_ids)], alone, atol=1e-4), f"row {j}"


def lora_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(("method", "precision"), [("lora", "fp32"), ("qlora", "bf16")])
def test_build_model_trains_adapters(tiny: Path, method: str, precision: str, rows_file: Path) -> None:
    examples, processor = encode(tiny, rows_file)
    batch = collate(examples, processor.tokenizer.pad_token_id)
    job = JobConfig.model_validate(
        {
            "model": str(tiny),
            "data": {"train": str(rows_file)},
            "method": method,
            "precision": precision,
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        }
    )
    arch = for_model_dir(tiny)
    model = build_model(job, arch, torch.device("cpu"))
    if method == "qlora":
        import bitsandbytes as bnb

        assert job.quantization.type == "nf4"
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "qlora loaded no 4-bit layer"
    lora = lora_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and trainable == set(lora), f"trainable outside LoRA: {sorted(trainable - set(lora))[:5]}"

    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    model.train()
    losses = []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as the train loop does
            loss = model(**batch).loss
        losses.append(float(loss.detach()))
        assert math.isfinite(losses[-1]), f"step {step}: loss {losses[-1]}"
        loss.backward()
        if step < 2:  # B starts at zero: only the B matrices get a gradient at first, every matrix from step 2
            silent = [n for n, p in lora.items() if (step or "lora_B" in n) and not (p.grad is not None and p.grad.abs().sum() > 0)]
            assert not silent, f"step {step}: no gradient on {silent[:5]}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < 0.5 * losses[0], f"{arch.name} {method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", list(MIXED_SIZES))
def test_a_filler_image_row_changes_no_real_row_and_scores_nothing(name: str, tmp_path: Path) -> None:
    """Under DeepSpeed a micro batch without an image gets jobs.data.filler_row, so that every rank runs the
    vision tower: a text row computes with it what it computes beside a real image row (PaliGemma: its
    prompt a bidirectional prefix in both), and the filler has no answer to score."""
    from transformers import AutoModelForImageTextToText

    from jobs.data import filler_row
    from jobs.evaluate import answer_stats

    path = MIXED_SIZES[name](tmp_path / name)
    rows = tinymodels.colour_rows(2, seed=3)
    data = tinymodels.write_parquet([{**rows[0], "image": None}, rows[1]], tmp_path / "text_row.parquet")
    (text, image_row), processor = encode(path, data)
    filler = filler_row(processor, with_image=True)
    assert (filler.labels == IGNORE_INDEX).all() and int((filler.input_ids == processor.image_token_id).sum()) > 0
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    pad = processor.tokenizer.pad_token_id
    mixed, beside = collate([text, image_row], pad), collate([text, filler], pad)
    assert "pixel_values" not in collate([text], pad) and "pixel_values" in beside
    with torch.no_grad():
        a, b = model(**mixed), model(**beside)
    n = len(text.input_ids)
    assert torch.allclose(a.logits[0, :n], b.logits[0, :n], atol=1e-4)
    alone = collate([text], pad)
    with torch.no_grad():
        scored = answer_stats(model(**alone).logits, alone["labels"])
    assert answer_stats(b.logits, beside["labels"])[1:] == (scored[1], scored[2], 1)  # the filler: no tokens, no example


def test_a_published_qwen2_vl_tokenizer_layout_loads_without_torchvision(tmp_path: Path, rows_file: Path) -> None:
    """The published Qwen2-VL checkpoints list their special tokens without naming an image_token; the stock
    processor falls back to <|image_pad|>, and so does rayft's image-only one (used without torchvision)."""
    import json

    path = tinymodels.build_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("image_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    examples, processor = encode(path, rows_file)
    assert processor.image_token == "<|image_pad|>"
    assert all(int((e.input_ids == processor.image_token_id).sum()) == IMAGE_TOKENS["qwen2_vl"] for e in examples)


@pytest.mark.parametrize("name", ["llava", *ARCHS, "llama", "qwen2"])
def test_logits_only_where_the_loss_is_give_the_models_own_loss_gradients_and_eval(name: str, rows_file: Path, tmp_path: Path) -> None:
    """Every architecture takes logits_to_keep: the head runs at the answer positions only (jobs/evaluate.answer_logits),
    and the loss, its gradients and the eval's numbers equal those from the model's own full-sequence logits."""
    from jobs.data import pad_token_id
    from jobs.evaluate import answer_logits, answer_loss, answer_stats, evaluate, keeps_logits

    torch.manual_seed(0)
    path = tinymodels.build_tiny_text(tmp_path / name, arch=name) if name in ("llama", "qwen2") else tinymodels.TINY_VLMS[name](tmp_path / name)
    arch = for_model_dir(path)
    processor = load_processor(str(path), arch)
    examples, _ = encode_rows(rows_file, DataConfig(train=str(rows_file)), processor, arch.kind == "vlm")
    batch = collate(examples, pad_token_id(processor))
    labels = batch.pop("labels")
    model = build_model(JobConfig.model_validate({"model": str(path), "data": {"train": str(rows_file)}, "method": "full", "precision": "fp32"}), arch, torch.device("cpu"))
    assert keeps_logits(model)
    model.train()
    own = model(**batch, labels=labels).loss
    own.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    kept = answer_loss(model, batch, labels, keep=True)
    kept.backward()
    assert torch.allclose(kept, own, atol=1e-5), (float(kept), float(own))
    assert own_grads and all(torch.allclose(p.grad, own_grads[n], atol=1e-5, rtol=1e-4) for n, p in model.named_parameters() if n in own_grads)
    with torch.no_grad():
        logits, _, _ = answer_logits(model, batch, labels, keep=True)
        assert logits.shape[0] == int((labels[:, 1:] != IGNORE_INDEX).sum())  # one row of logits per answer token
        full = answer_stats(model(**batch).logits, labels)
    got = evaluate(model, [{**batch, "labels": labels}], torch.device("cpu"), torch.no_grad, keep=True)
    assert math.isclose(got["eval_loss"], full[0] / full[1], rel_tol=1e-5) and got["eval_accuracy"] == full[2] / full[3]


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_freeze_and_learning_rate_groups_by_component_reach_the_optimizer(name: str, rows_file: Path, tmp_path: Path) -> None:
    """freeze: [vision] leaves the vision tower (not Qwen2-VL's merger, the projector inside it) without gradients;
    train.lr_groups puts the projector in an optimizer group of its own rate, the rest at train.lr, and the schedule
    scales both alike. Without lr_groups the optimizer has one group, as before."""
    from jobs.data import pad_token_id
    from jobs.train_loop import build_training, lr_lambda, optimizer_step

    path = tinymodels.TINY_VLMS[name](tmp_path / name)
    arch = for_model_dir(path)
    raw = {"model": str(path), "data": {"train": str(rows_file)}, "method": "full", "precision": "fp32", "freeze": ["vision"],
           "train": {"lr": 1e-4, "lr_groups": {"projector": 1e-2}, "warmup_ratio": 0.0}}
    job = JobConfig.model_validate(raw)
    schedule = lambda step: lr_lambda(step, total=10, warmup=0, schedule="cosine")  # noqa: E731
    training = build_training(job, arch, torch.device("cpu"), 1, schedule, None, ddp=False)
    trainable = {n: arch.component_of(n) for n, p in training.core.named_parameters() if p.requires_grad}
    assert set(trainable.values()) == {"projector", "language"}
    assert sorted((g["component"], g["lr"]) for g in training.lr_groups) == [("projector", 1e-2), ("rest", 1e-4)]
    by_lr = {g["lr"]: g for g in training.optimizer.param_groups}
    assert set(by_lr) == {1e-2, 1e-4}
    projector = {id(p) for n, p in training.core.named_parameters() if trainable.get(n) == "projector"}
    assert {id(p) for p in by_lr[1e-2]["params"]} == projector
    examples, processor = encode(path, rows_file)
    before = {n: p.detach().clone() for n, p in training.core.named_parameters()}
    optimizer_step(training, [collate(examples, pad_token_id(processor))], torch.device("cpu"))
    assert [g["lr"] for g in training.optimizer.param_groups] == [g["initial_lr"] * schedule(1) for g in training.optimizer.param_groups]
    moved = {arch.component_of(n) for n, p in training.core.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"projector", "language"}
    plain = build_training(JobConfig.model_validate({**raw, "freeze": [], "train": {"lr": 1e-4}}), arch, torch.device("cpu"), 1, schedule, None, ddp=False)
    assert len(plain.optimizer.param_groups) == 1 and [g["component"] for g in plain.lr_groups] == ["rest"]
