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
