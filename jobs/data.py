"""Rows in, batches out: row validation, encoding with the model's own processor and chat template, and
collation with loss on the answer tokens only. These are per-row functions: Ray Data tasks call them
(`jobs/stream.py`), and so do in-process callers (the merge's parity check, benchmarks, tests).

`check_rows` and `read_table` need only pyarrow and PIL; encoding needs the processor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.rowstore import DataError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from orchestrator.config import DataConfig

__all__ = ["DataError"]
IGNORE_INDEX = -100
# Token-level tensors a processor may return beside input_ids, and the value answer tokens get:
# Qwen2-VL's mm_token_type_ids mark image tokens (answer tokens are text: 0); PaliGemma's token_type_ids
# mark the suffix (1), which makes the answer causal rather than part of the bidirectional prefix.
TOKEN_LEVEL_FILL = {"mm_token_type_ids": 0, "token_type_ids": 1}


def columns(cfg: DataConfig, needs_image: bool) -> dict[str, str]:
    """The columns a job reads from its data files, each with the option that names it."""
    text = {cfg.messages: "data.messages"} if cfg.messages else {cfg.prompt: "data.prompt", cfg.answer: "data.answer"}
    return {**text, **({cfg.image: "data.image"} if needs_image else {})}


def read_table(path: str | Path) -> pa.Table:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).read()  # one file; pq.read_table would import pyarrow.dataset and pandas (0.2 s)
    if path.suffix == ".jsonl":
        return pj.read_json(path)
    raise DataError([f"{path}: unsupported file type (use .parquet or .jsonl)"])


def _image_bytes(value: Any, data_file: Path) -> bytes:
    """An image cell is encoded bytes, a path relative to the data file, or HF datasets' {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else data_file.parent / value
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return path.read_bytes()
    raise ValueError("empty image cell")


def load_image(value: Any, data_file: Path):
    from PIL import Image

    img = Image.open(io.BytesIO(_image_bytes(value, data_file)))
    img.load()
    return img.convert("RGB")


def check_row(row: dict[str, Any], cfg: DataConfig, needs_image: bool, data_file: Path) -> tuple[list[str], Any]:
    """(what is wrong with one row, empty when nothing; its decoded image, when it has one that decodes)."""
    problems, image = [], None
    try:
        conversation(row, cfg)
    except ValueError as e:
        problems.append(str(e))
    if needs_image:
        try:
            image = load_image(row[cfg.image], data_file)
        except FileNotFoundError as e:
            problems.append(str(e))
        except Exception as e:
            problems.append(f"image does not decode ({type(e).__name__}: {e})")
    return problems, image


def check_rows(data_file: str | Path, cfg: DataConfig, needs_image: bool) -> int:
    """Validate every row of one data file in this process; returns the row count or raises DataError
    listing every bad row. (Training validates through Ray Data instead: jobs/stream.py.)"""
    data_file = Path(data_file)
    try:
        table = read_table(data_file)
    except DataError:
        raise
    except Exception as e:  # pyarrow's parse errors name the problem; add the file
        raise DataError([f"{data_file}: cannot be read ({e})"]) from None
    wanted = columns(cfg, needs_image)
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(
            [f"{data_file}: missing column `{c}` (has: {', '.join(table.column_names)}); set {wanted[c]} to the right column" for c in missing]
        )
    if table.num_rows == 0:
        raise DataError([f"{data_file}: no rows"])
    problems = [f"{data_file} row {i}: {p}" for i, row in enumerate(table.to_pylist()) for p in check_row(row, cfg, needs_image, data_file)[0]]
    if problems:
        raise DataError(problems)
    return table.num_rows


def conversation(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str]:
    """A row as (messages before the answer, answer). Raises ValueError saying what is wrong with the row."""
    if cfg.messages:
        messages = row[cfg.messages]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"no messages (column `{cfg.messages}`)")
        if any(not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"each message needs a string role and content (column `{cfg.messages}`)")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant's answer (column `{cfg.messages}`)")
        if not any(m["role"] == "user" for m in messages[:-1]):
            raise ValueError(f"no user message before the answer (column `{cfg.messages}`)")
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        answer = messages[-1]["content"]
    else:
        prompt, answer = row[cfg.prompt], row[cfg.answer]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"empty prompt (column `{cfg.prompt}`)")
        history = [{"role": "user", "content": prompt}]
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"empty answer (column `{cfg.messages or cfg.answer}`)")
    return history, answer


@dataclass
class Encoded:
    input_ids: torch.Tensor
    labels: torch.Tensor
    extras: dict[str, torch.Tensor]
    row: int


def prompt_text(processor: Any, history: list[dict[str, str]] | str, with_image: bool) -> str:
    """The chat-templated prompt up to the assistant's turn; the image goes into the first user message."""
    if isinstance(history, str):
        history = [{"role": "user", "content": history}]
    if with_image and getattr(processor, "chat_template", None) is None:
        # No chat template, as in PaliGemma's released checkpoints: the processor lays the prompt out itself
        # (PaliGemma: image tokens, bos, prompt, "\n"; the answer then follows as the suffix).
        if len(history) != 1:
            raise ValueError("the model has no chat template: a row can hold only one user message")
        return getattr(processor, "image_token", "") + history[0]["content"]
    messages: list[dict[str, Any]] = []
    placed = not with_image
    for m in history:
        if with_image:  # VLM processors take structured content
            content: Any = [{"type": "text", "text": m["content"]}]
            if not placed and m["role"] == "user":
                content.insert(0, {"type": "image"})
                placed = True
            messages.append({"role": m["role"], "content": content})
        else:
            messages.append(dict(m))
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_row(row: dict[str, Any], i: int, cfg: DataConfig, processor: Any, with_image: bool, data_file: Path) -> Encoded:
    """One row tokenized with the model's processor, whatever its length (callers check data.max_length).
    Raises ValueError (bad conversation) or the image's decoding error."""
    import torch
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    history, answer = conversation(row, cfg)
    text = prompt_text(processor, history, with_image)
    if with_image:
        image = load_image(row[cfg.image], data_file)
        if cfg.blind:  # a uniform grey image of the same size: no information, same token layout
            image = Image.new("RGB", image.size, (128, 128, 128))
        enc = processor(images=[image], text=[text], return_tensors="pt")
    else:
        enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    prompt_ids = enc["input_ids"][0]
    answer_ids = torch.tensor(answer_token_ids(tokenizer, answer), dtype=torch.long)
    extras = {}
    for key, value in enc.items():
        # labels: ours (answer tokens only); PaliGemma's processor returns its own prompt-length ones.
        if key in ("input_ids", "attention_mask", "labels") or not isinstance(value, torch.Tensor):
            continue
        if key in TOKEN_LEVEL_FILL:
            fill = torch.full((len(answer_ids),), TOKEN_LEVEL_FILL[key], dtype=value.dtype)
            value = torch.cat([value[0], fill])
        extras[key] = value
    return Encoded(
        input_ids=torch.cat([prompt_ids, answer_ids]),
        labels=torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
        extras=extras,
        row=i,
    )


def encode_row_payload(row: dict[str, Any], i: int, cfg: DataConfig, processor: Any, with_image: bool, data_file: Path) -> bytes:
    """One encoded row as bytes (jobs/encoded.py keeps them on disk); decode_payload reverses it."""
    import pickle

    e = encode_row(row, i, cfg, processor, with_image, data_file)
    return pickle.dumps({"input_ids": e.input_ids.numpy(), "labels": e.labels.numpy(), "extras": {k: v.numpy() for k, v in e.extras.items()}}, protocol=5)


def decode_payload(payload: bytes, i: int) -> Encoded:
    import pickle

    import torch

    p = pickle.loads(payload)
    return Encoded(torch.from_numpy(p["input_ids"]), torch.from_numpy(p["labels"]), {k: torch.from_numpy(v) for k, v in p["extras"].items()}, i)


def answer_token_ids(tokenizer: Any, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def too_long_message(data_file: Path | str, i: int, length: int, cfg: DataConfig) -> str:
    return (
        f"{data_file} row {i}: longer than data.max_length={cfg.max_length} ({length} tokens, image tokens included); "
        "raise data.max_length or set data.too_long: drop"
    )


def encode_rows(
    data_file: str | Path,
    cfg: DataConfig,
    processor: Any,
    with_image: bool,
    rows: list[int] | None = None,
) -> tuple[list[Encoded], list[int]]:
    """Tokenize rows of a file (all, or the given indices) in this process. Returns (examples, dropped rows).

    Never truncates: a row longer than data.max_length is an error naming it, or dropped and counted
    when data.too_long is `drop`, so image tokens are never cut.
    """
    data_file = Path(data_file)
    table = read_table(data_file)
    indices = list(range(table.num_rows)) if rows is None else rows
    examples, dropped, too_long = [], [], []
    for i in indices:
        e = encode_row(table.slice(i, 1).to_pylist()[0], i, cfg, processor, with_image, data_file)
        if len(e.input_ids) > cfg.max_length:
            (dropped if cfg.too_long == "drop" else too_long).append((i, len(e.input_ids)))
            continue
        examples.append(e)
    if too_long:
        raise DataError([too_long_message(data_file, i, n, cfg) for i, n in too_long])
    return examples, [i for i, _ in dropped]


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token-level tensors; concatenate the rest (pixel_values, image_grid_thw, ...) along dim 0."""
    import torch

    longest = max(len(e.input_ids) for e in examples)
    n = len(examples)
    batch = {
        "input_ids": torch.full((n, longest), pad_id, dtype=torch.long),
        "labels": torch.full((n, longest), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((n, longest), dtype=torch.long),
    }
    for key in TOKEN_LEVEL_FILL:
        if key in examples[0].extras:
            batch[key] = torch.zeros((n, longest), dtype=examples[0].extras[key].dtype)
    for j, e in enumerate(examples):
        length = len(e.input_ids)
        batch["input_ids"][j, :length] = e.input_ids
        batch["labels"][j, :length] = e.labels
        batch["attention_mask"][j, :length] = 1
        for key in TOKEN_LEVEL_FILL:
            if key in e.extras:
                batch[key][j, :length] = e.extras[key]
    for key in examples[0].extras:
        if key not in TOKEN_LEVEL_FILL:
            batch[key] = cat_padded([e.extras[key] for e in examples])
    return batch


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest. A no-op for fixed-size images
    (LLaVA, PaliGemma) and Qwen2-VL's flat patches; Idefics3 with image splitting gives each row as many
    crops as its aspect ratio needs, and its own image processor pads a batch the same way: all-zero crops
    are skipped by the model and pixel_attention_mask is 0 on the padding."""
    import torch

    tail = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *tail))
        out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
        padded.append(out)
    return torch.cat(padded)
