"""Data rows: every bad-row kind is caught before training with its file and row; encoding never truncates."""

from __future__ import annotations

import pytest
import torch

from jobs.data import DataError, check_rows, collate, encode_rows, read_table
from orchestrator import tinymodels
from orchestrator.config import DataConfig


def rows(n=6, task="english"):
    return tinymodels.colour_rows(n, task, seed=3)


def bad(path, needs_image=True, **cfg) -> str:
    with pytest.raises(DataError) as e:
        check_rows(path, DataConfig(train=str(path), **cfg), needs_image)
    return str(e.value)


def test_good_parquet_and_jsonl_with_image_paths(tmp_path):
    good = tinymodels.write_parquet(rows(), tmp_path / "good.parquet")
    assert check_rows(good, DataConfig(train=str(good)), True) == 6
    jsonl = tinymodels.write_jsonl_with_image_files(rows(), tmp_path / "rows.jsonl")
    assert check_rows(jsonl, DataConfig(train=str(jsonl)), True) == 6


def test_missing_column_names_the_file_and_the_option(tmp_path):
    path = tinymodels.write_parquet([{k: v for k, v in r.items() if k != "answer"} for r in rows()], tmp_path / "a.parquet")
    msg = bad(path)
    assert str(path) in msg and "missing column `answer`" in msg and "data.answer" in msg


def test_undecodable_image_empty_answer_and_missing_file_name_their_rows(tmp_path):
    broken = rows()
    broken[2]["image"] = b"not an image"
    broken[4]["answer"] = "  "
    path = tinymodels.write_parquet(broken, tmp_path / "b.parquet")
    msg = bad(path)
    assert f"{path} row 2: image does not decode" in msg
    assert f"{path} row 4: empty answer" in msg

    jsonl = tinymodels.write_jsonl_with_image_files(rows(), tmp_path / "c.jsonl")
    (tmp_path / "c_images" / "3.png").unlink()
    msg = bad(jsonl)
    assert f"{jsonl} row 3: image file not found" in msg


def test_unreadable_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("{not json\n")
    assert "cannot be read" in bad(path)


@pytest.fixture(scope="module")
def processor(world):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(world / "init")


def test_loss_covers_answer_tokens_only(world, processor):
    cfg = DataConfig(train=str(world / "data/english_train.parquet"))
    examples, dropped = encode_rows(cfg.train, cfg, processor, True, [0, 1, 2])
    assert not dropped
    table = read_table(cfg.train).slice(0, 3).to_pylist()
    tok = processor.tokenizer
    for e, row in zip(examples, table, strict=True):
        answer_ids = e.labels[e.labels != -100].tolist()
        assert answer_ids == tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # every image token of the prompt is present and masked out of the loss
        image_id = tok.convert_tokens_to_ids("<image>")
        assert int((e.input_ids == image_id).sum()) == (tinymodels.IMAGE_SIZE // tinymodels.PATCH_SIZE) ** 2
        assert bool((e.labels[e.input_ids == image_id] == -100).all())
    batch = collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 3


def test_too_long_rows_error_or_drop_never_truncate(world, processor):
    path = str(world / "data/english_train.parquet")
    cfg = DataConfig(train=path, max_length=20)  # shorter than 16 image tokens + the question
    with pytest.raises(DataError) as e:
        encode_rows(path, cfg, processor, True, [0, 1])
    assert f"{path} row 0: longer than data.max_length=20" in str(e.value) and "data.too_long: drop" in str(e.value)
    examples, dropped = encode_rows(path, DataConfig(train=path, max_length=20, too_long="drop"), processor, True, [0, 1])
    assert examples == [] and dropped == [0, 1]


def test_blind_images_carry_no_information(world, processor):
    path = str(world / "data/english_train.parquet")
    blind, _ = encode_rows(path, DataConfig(train=path, blind=True), processor, True, [0, 1])
    seen, _ = encode_rows(path, DataConfig(train=path), processor, True, [0, 1])
    assert all(float(e.extras["pixel_values"].std()) == 0.0 for e in blind)  # uniform
    assert torch.equal(blind[0].extras["pixel_values"], blind[1].extras["pixel_values"])  # identical across rows
    assert blind[0].input_ids.tolist() == seen[0].input_ids.tolist()  # same token layout


def as_messages(row: dict) -> dict:
    return {"image": row["image"], "messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]}


def test_chat_messages_column_encodes_like_prompt_answer(world, processor, tmp_path):
    plain = rows(4)
    path = tinymodels.write_parquet([as_messages(r) for r in plain], tmp_path / "chat.parquet")
    cfg = DataConfig(train=str(path), messages="messages")
    assert check_rows(path, cfg, True) == 4
    chat, _ = encode_rows(path, cfg, processor, True)
    ref_path = tinymodels.write_parquet(plain, tmp_path / "plain.parquet")
    ref, _ = encode_rows(ref_path, DataConfig(train=str(ref_path)), processor, True)
    for a, b in zip(chat, ref, strict=True):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_chat_messages_must_end_with_the_answer(tmp_path):
    broken = [as_messages(r) for r in rows(3)]
    broken[1]["messages"] = broken[1]["messages"][:1]  # no assistant turn
    path = tinymodels.write_parquet(broken, tmp_path / "chat.parquet")
    msg = bad(path, messages="messages")
    assert f"{path} row 1: the last message must be the assistant's answer" in msg


def test_a_photo_sized_image_under_two_pixel_budgets_gives_the_processors_own_token_counts(tmp_path):
    """data.max_pixels resizes an image (aspect kept) before the processor: a 2000x1500 photo on Qwen2-VL (dynamic
    resolution; its own pixel cap lifted here, as a user's 12-megapixel setting would) makes the image tokens that
    the processor's formula (smart_resize, then one token per merged patch) predicts for the budgeted size, and
    LLaVA (fixed size) makes the same tokens whatever the budget. The validation pass reports them per row."""
    import io
    import json
    import math

    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize,  # the processor rayft loads (no torchvision)
    )

    from jobs.data import encode_row, fit_pixels
    from jobs.model import load_processor
    from jobs.stream import build_stores, image_token_summary, index
    from orchestrator.architectures import for_model_dir
    from orchestrator.config import build_job

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(buf, format="PNG")
    row = {**tinymodels.colour_rows(1, seed=3)[0], "image": buf.getvalue()}
    data = tinymodels.write_parquet([row] * 4, tmp_path / "photos.parquet")
    qwen = tinymodels.TINY_VLMS["qwen2_vl"](tmp_path / "qwen")
    saved = json.loads((qwen / "processor_config.json").read_text())
    saved["image_processor"]["size"] = {"longest_edge": 4000 * 4000, "shortest_edge": 64}  # max_pixels, min_pixels
    (qwen / "processor_config.json").write_text(json.dumps(saved))
    config = {**saved["image_processor"], "max_pixels": 4000 * 4000, "min_pixels": 64}
    processor = load_processor(str(qwen), for_model_dir(qwen))
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    factor = config["patch_size"] * config["merge_size"]
    counts = {}
    for budget in (1_000_000, 250_000):
        w, h = fit_pixels(Image.new("RGB", (2000, 1500)), budget, None).size
        assert w * h <= budget and abs(w / h - 4 / 3) < 0.01
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=config["min_pixels"], max_pixels=config["max_pixels"])
        expected = (rh // factor) * (rw // factor)
        cfg = DataConfig(train=str(data), max_pixels=budget, max_length=100_000)
        counts[budget] = int((encode_row(row, 0, cfg, processor, True, data).input_ids == pad).sum())
        assert counts[budget] == expected, (budget, counts[budget], expected)
        job, _ = build_job({"model": str(qwen), "data": {"train": str(data), "max_pixels": budget, "max_length": 100_000}, "method": "full"})
        ix = index(job, build_stores(job, tmp_path / f"cache-{budget}"))["train"]
        assert list(ix.image_tokens) == [expected] * 4 and image_token_summary(ix) == f"image tokens per row: min {expected}, median {expected}, max {expected}"
    assert math.isclose(counts[1_000_000] / counts[250_000], 4, rel_tol=0.1)  # a quarter of the pixels, a quarter of the tokens
    llava = tinymodels.TINY_VLMS["llava"](tmp_path / "llava")
    processor = load_processor(str(llava), for_model_dir(llava))
    fixed = {b: len(encode_row(row, 0, DataConfig(train=str(data), max_pixels=b), processor, True, data).input_ids) for b in (1_000_000, 250_000, None)}
    assert len(set(fixed.values())) == 1, fixed
