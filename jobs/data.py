"""Rows in, batches out: row validation, encoding with the model's own processor and chat template, and
collation with loss on the answer tokens only. These are per-row functions: Ray Data tasks call them
(`jobs/stream.py`), and so do in-process callers (the merge's parity check, benchmarks, tests).

    row --chat.conversation--> messages (content parts) + images --layout--> text pieces around the trained
    answers --encode_row--> input_ids, labels (answers only), image tensors; measure() gives the same length
    without the image maths.

`check_rows` and `read_table` need only pyarrow and PIL; encoding needs the processor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.chat import IMAGE_PART, Conversation, RowError, conversation
from jobs.rowstore import DataError, problem

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from orchestrator.config import DataConfig

__all__ = ["DataError", "RowError", "conversation"]
IGNORE_INDEX = -100
# Token-level tensors a processor may return beside input_ids, and the value answer tokens get:
# Qwen2-VL's mm_token_type_ids mark image tokens (answer tokens are text: 0); PaliGemma's token_type_ids
# mark the suffix (1), which makes the answer causal rather than part of the bidirectional prefix.
TOKEN_LEVEL_FILL = {"mm_token_type_ids": 0, "token_type_ids": 1}


def columns(cfg: DataConfig, needs_image: bool) -> dict[str, str]:
    """The columns a job must find in its data files, each with the option that names it."""
    text = {cfg.messages: "data.messages"} if cfg.messages else {cfg.prompt: "data.prompt", cfg.answer: "data.answer"}
    if not needs_image:
        return text
    if cfg.images:
        return {**text, cfg.images: "data.images"}
    return text if cfg.messages else {**text, cfg.image: "data.image"}


def optional_columns(cfg: DataConfig, needs_image: bool) -> tuple[str, ...]:
    """Columns read when a file has them: with data.messages, a row's images may sit in data.image or in its parts."""
    return (cfg.image,) if needs_image and cfg.messages and not cfg.images else ()


def read_table(path: str | Path) -> pa.Table:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).read()  # one file; pq.read_table would import pyarrow.dataset and pandas (0.2 s)
    if path.suffix == ".jsonl":
        return pj.read_json(path)
    raise DataError([problem(str(path), "unsupported file type", "use a .parquet or .jsonl file")])


def _image_bytes(value: Any, data_file: Path) -> bytes:
    """An image cell is encoded bytes, a path relative to the data file (or a file:// or base64 data: URI),
    or HF datasets' {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        if not value:
            raise RowError("empty image cell", "give the image's bytes or its path, or null for a text row")
        return bytes(value)
    if isinstance(value, str) and value:
        if value.startswith("data:"):
            import base64

            return base64.b64decode(value.partition(",")[2])
        if value.startswith(("http://", "https://")):
            raise RowError(f"image is a remote URL ({value[:60]})", "download the images and give their paths (rayft reads local files only)")
        path = image_path(value, data_file)
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path.read_bytes()
    raise RowError("empty image cell", "give the image's bytes or its path, or null for a text row")


def image_path(value: str, data_file: Path) -> Path:
    value = value.removeprefix("file://")
    return Path(value) if Path(value).is_absolute() else data_file.parent / value


def load_image(value: Any, data_file: Path, cfg: DataConfig | None = None):
    """An image cell decoded to RGB, within cfg's pixel budget (fit_pixels)."""
    from PIL import Image

    img = Image.open(io.BytesIO(_image_bytes(value, data_file)))
    img.load()
    img = img.convert("RGB")
    return fit_pixels(img, cfg.max_pixels, cfg.min_pixels) if cfg is not None else img


def fit_pixels(img: Any, max_pixels: int | None, min_pixels: int | None) -> Any:
    """`img` resized (bicubic, aspect kept) to at most max_pixels and at least min_pixels (width x height); as is
    when it is within both or neither is set."""
    import math

    from PIL import Image

    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    elif min_pixels is not None and w * h < min_pixels:
        scale = math.sqrt(min_pixels / (w * h))
        size = (math.ceil(w * scale), math.ceil(h * scale))
    else:
        return img
    return img.resize(size, Image.Resampling.BICUBIC)


def check_row(
    row: dict[str, Any], cfg: DataConfig, needs_image: bool, data_file: Path, max_images: int | None = None
) -> tuple[list[RowError], list[Any]]:
    """(what is wrong with one row, empty when nothing; its decoded images, in order)."""
    try:
        conv = conversation(row, cfg, needs_image)
    except RowError as e:
        return [e], []
    problems: list[RowError] = []
    if max_images is not None and len(conv.images) > max_images:
        problems.append(RowError(f"{len(conv.images)} images, but the model takes at most {max_images} per row", "split the row into rows of one image each, or drop it"))
    images = []
    for k, cell in enumerate(conv.images):
        which = f"image {k + 1} of {len(conv.images)}" if len(conv.images) > 1 else "image"
        try:
            images.append(load_image(cell, data_file, cfg))
        except RowError as e:
            problems.append(RowError(f"{which}: {e.what}" if len(conv.images) > 1 else e.what, e.fix))
        except FileNotFoundError as e:
            problems.append(RowError(f"{which} file not found: {e}", "check the path (relative paths resolve against the data file's folder)"))
        except Exception as e:
            why = "not an image format PIL can read" if type(e).__name__ == "UnidentifiedImageError" else f"{type(e).__name__}: {e}"
            problems.append(RowError(f"{which} does not decode ({why})", "re-encode it as PNG or JPEG, or drop the row"))
    return problems, images


def check_rows(data_file: str | Path, cfg: DataConfig, needs_image: bool) -> int:
    """Validate every row of one data file in this process; returns the row count or raises DataError
    listing every bad row. (Training validates through Ray Data instead: jobs/stream.py.)"""
    data_file = Path(data_file)
    try:
        table = read_table(data_file)
    except DataError:
        raise
    except Exception as e:  # pyarrow's parse errors name the problem; add the file
        raise DataError([problem(str(data_file), f"cannot be read ({e})", "check that it is valid Parquet or JSON Lines")]) from None
    wanted = columns(cfg, needs_image)
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError([problem(str(data_file), f"missing column `{c}` (has: {', '.join(table.column_names)})", f"set {wanted[c]} to the right column") for c in missing])
    if table.num_rows == 0:
        raise DataError([problem(str(data_file), "no rows", "point the option at a file with rows")])
    problems = [
        problem(f"{data_file} row {i}", p.what, p.fix) for i, row in enumerate(table.to_pylist()) for p in check_row(row, cfg, needs_image, data_file)[0]
    ]
    if problems:
        raise DataError(problems)
    return table.num_rows


@dataclass
class Encoded:
    input_ids: torch.Tensor
    labels: torch.Tensor
    extras: dict[str, torch.Tensor]
    row: int


# ---- from a conversation to tokens ----------------------------------------------------------------------

SENTINEL = "\x00rayft-answer-{}\x00"  # stands in for an earlier answer while the chat template renders


@dataclass(frozen=True)
class Layout:
    """A conversation as the text around its trained answers: pieces[j] (unlabelled) comes before answers[j]."""

    pieces: list[str]
    answers: list[str]
    images: list[list[int]]
    """Which of the conversation's images each piece holds (indices, in order)."""


def layout(conv: Conversation, processor: Any, with_image: bool) -> Layout:
    """Render the conversation with the model's chat template (system messages and every turn included).
    The last answer follows the generation prompt, as at inference; earlier trained answers are found by
    rendering them as sentinels. Each answer is then its text + eos (so the template's end-of-turn token
    right after it is not repeated)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    last = len(conv.messages) - 1
    marked = [k for k in conv.trained if k != last]
    history = []
    for k, m in enumerate(conv.messages[:-1]):
        content = [{"type": "text", "text": SENTINEL.format(k)}] if k in marked else m["content"]
        history.append({"role": m["role"], "content": content if with_image else "\n".join(p["text"] for p in content)})
    per_message = conv.images_per_message()
    if with_image and getattr(processor, "chat_template", None) is None:
        # No chat template, as in PaliGemma's released checkpoints: the processor lays the prompt out itself
        # (PaliGemma: image tokens, bos, prompt, "\n"; the answer then follows as the suffix).
        if len(history) != 1:
            raise RowError("the model has no chat template: a row can hold only one user message and its answer", "give single-turn rows without a system message")
        text = getattr(processor, "image_token", "") * per_message[0] + conv.text(0)
        return Layout([text], [conv.text(last)], [list(range(len(conv.images)))])
    text = processor.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    pieces, rest = [], text
    for k in marked:
        before, found, rest = rest.partition(SENTINEL.format(k))
        if not found:
            raise RowError("the model's chat template rewrites earlier assistant messages, so their tokens cannot be found", "set data.train_on: last_turn (loss on the final answer only)")
        pieces.append(before)
        eos = tokenizer.eos_token or ""
        if eos and rest.lstrip().startswith(eos):
            rest = rest.lstrip()[len(eos) :]
    pieces.append(rest)
    images, j, seen = [[] for _ in pieces], 0, 0
    for k, n in enumerate(per_message):
        images[j].extend(range(seen, seen + n))
        seen += n
        if j < len(marked) and k == marked[j]:
            j += 1
    return Layout(pieces, [conv.text(k) for k in (*marked, last)], images)


def prompt_text(processor: Any, question: str, with_image: bool) -> str:
    """The chat-templated prompt for one question (with one image first when with_image), up to the answer."""
    content = ([dict(IMAGE_PART)] if with_image else []) + [{"type": "text", "text": question}]
    conv = Conversation([{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "-"}]}], [None] * with_image, (1,))
    return layout(conv, processor, with_image).pieces[0]


def _tokens(processor: Any, text: str, images: list[Any], first: bool, vlm: bool) -> dict[str, Any]:
    """One piece tokenized: by the processor when it holds images (which expands their tokens), else by the
    tokenizer. Special tokens (a bos) only at a VLM row's start, as its processor adds them."""
    if images:
        kwargs = {} if first else {"add_special_tokens": False}
        return processor(images=[images], text=[text], return_tensors="pt", **kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer([text], return_tensors="pt", add_special_tokens=first and vlm)


def _image_tensors(enc: Any) -> dict[str, Any]:
    """A processor output's per-image tensors (pixel_values, image_grid_thw, ...): not the token-level ones.
    labels: ours (answer tokens only); PaliGemma's processor returns its own prompt-length ones."""
    import torch

    return {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "labels", *TOKEN_LEVEL_FILL) and isinstance(v, torch.Tensor)}


def encode_row(row: dict[str, Any], i: int, cfg: DataConfig, processor: Any, with_image: bool, data_file: Path) -> Encoded:
    """One row tokenized with the model's processor, whatever its length (callers check data.max_length).
    Raises RowError (bad conversation) or an image's decoding error."""
    import torch
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    conv = conversation(row, cfg, with_image)
    lay = layout(conv, processor, with_image)
    images = [load_image(c, data_file, cfg) for c in conv.images]
    if cfg.blind:  # uniform grey images of the same sizes: no information, same token layout
        images = [Image.new("RGB", im.size, (128, 128, 128)) for im in images]
    ids, labels, token_level, image_level = [], [], [], {}
    for j, piece in enumerate(lay.pieces):
        enc = _tokens(processor, piece, [images[x] for x in lay.images[j]], j == 0, with_image)
        piece_ids = enc["input_ids"][0]
        answer_ids = torch.tensor(answer_token_ids(tokenizer, lay.answers[j]), dtype=torch.long)
        ids += [piece_ids, answer_ids]
        labels += [torch.full_like(piece_ids, IGNORE_INDEX), answer_ids]
        token_level.append({k: v[0] for k, v in enc.items() if k in TOKEN_LEVEL_FILL and isinstance(v, torch.Tensor)})
        if lay.images[j]:
            image_level = _image_tensors(enc)
    if sum(bool(x) for x in lay.images) > 1:  # images in several pieces: their tensors from one call, in order
        enc = processor(images=[images], text=["".join(lay.pieces)], return_tensors="pt")
        image_level = _image_tensors(enc)
    extras = dict(image_level)
    for key in {k for t in token_level for k in t}:
        parts = []
        for j, t in enumerate(token_level):
            piece_len, answer_len = len(ids[2 * j]), len(ids[2 * j + 1])
            parts.append(t[key] if key in t else torch.zeros(piece_len, dtype=torch.long))
            parts.append(torch.full((answer_len,), TOKEN_LEVEL_FILL[key], dtype=parts[-1].dtype))
        extras[key] = torch.cat(parts)
    return Encoded(input_ids=torch.cat(ids), labels=torch.cat(labels), extras=extras, row=i)


_expansion: dict[tuple[int, int, int], tuple[int, int]] = {}  # (processor, width, height) -> _image_size_tokens


def measure(row: dict[str, Any], cfg: DataConfig, processor: Any, with_image: bool, images: list[Any]) -> int:
    """A row's encoded length (pieces with image tokens + answers + eos) without the image maths on every row:
    what an image adds to the tokenized text depends only on its size, so the processor runs once per image
    size (per process) and other rows only tokenize. images: the row's decoded images (check_row)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    lay = layout(conversation(row, cfg, with_image), processor, with_image)
    n = 0
    for j, piece in enumerate(lay.pieces):
        n += len(tokenizer(piece, add_special_tokens=j == 0 and with_image)["input_ids"]) + len(answer_token_ids(tokenizer, lay.answers[j]))
    return n + sum(_image_size_tokens(processor, image.size)[0] for image in images)


def image_tokens(processor: Any, images: list[Any]) -> int:
    """The model's image tokens in a row (its image token id, as many as the processor expands each image to)."""
    return sum(_image_size_tokens(processor, image.size)[1] for image in images)


def _image_size_tokens(processor: Any, size: tuple[int, int]) -> tuple[int, int]:
    """(tokens an image of this size adds to the text, the image tokens it becomes): the processor runs once per
    image size (per process), on a grey image of that size, since both depend only on the size."""
    key = (id(processor), *size)
    if key not in _expansion:
        from PIL import Image

        tokenizer = getattr(processor, "tokenizer", processor)
        text = prompt_text(processor, "a", True)
        full = processor(images=[[Image.new("RGB", size, (128, 128, 128))]], text=[text], return_tensors="pt")["input_ids"][0]
        added = len(full) - len(tokenizer(text, add_special_tokens=True)["input_ids"])
        image_id = getattr(processor, "image_token_id", None)
        if image_id is None and getattr(processor, "image_token", None):
            image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        _expansion[key] = (added, int((full == image_id).sum()) if image_id is not None else added)
    return _expansion[key]


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
    return problem(
        f"{data_file} row {i}",
        f"longer than data.max_length={cfg.max_length} ({length} tokens, image tokens included)",
        f"raise data.max_length to at least {length}, or set data.too_long: drop (rows are never truncated)",
    )


def read_head(path: str | Path, n: int) -> pa.Table:
    """The first n rows of a data file, reading no more of it than that (a few parquet row groups, or the
    first lines of a JSONL file)."""
    from itertools import islice

    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix == ".parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=n)
        first = next(batches, None)
        return pa.Table.from_batches([first]) if first is not None else read_table(path).slice(0, 0)
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            head = b"".join(islice(f, n))
        return pj.read_json(pa.BufferReader(head)) if head.strip() else read_table(path).slice(0, 0)
    return read_table(path)  # its error names the supported types


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


def filler_row(processor: Any, with_image: bool) -> Encoded:
    """A row that trains and scores nothing (every label ignored): one small grey image under an empty
    prompt for a VLM, one token for a text model. Under DeepSpeed every rank must run the same modules in
    every step (ZeRO-3 gathers the parameters of the modules that run; ZeRO-1/2 reduce gradients in buckets
    as they are produced): a VLM micro batch without an image gets this row, so every rank runs the vision
    tower; under ZeRO-3 a rank with fewer eval batches than another also runs batches of it alone
    (docs/scaling.md, "Keeping ranks in step"). Its loss terms are ignored, so the step's loss and
    gradients are those of the real rows."""
    import torch
    from PIL import Image

    if with_image:
        enc = _tokens(processor, prompt_text(processor, "", True), [Image.new("RGB", (64, 64), (128, 128, 128))], True, True)
        ids = enc["input_ids"][0]
        extras = {k: v[0] for k, v in enc.items() if k in TOKEN_LEVEL_FILL and isinstance(v, torch.Tensor)}
        extras.update(_image_tensors(enc))
    else:
        ids, extras = torch.tensor([pad_token_id(processor)], dtype=torch.long), {}
    return Encoded(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), extras=extras, row=-1)


def has_image(example: Encoded) -> bool:
    return any(k not in TOKEN_LEVEL_FILL for k in example.extras)


def pad_token_id(processor: Any) -> int:
    """The id collate() pads input_ids with: the tokenizer's pad token (0 where it has none)."""
    return getattr(processor, "tokenizer", processor).pad_token_id or 0


def collate(examples: list[Encoded], pad_id: int, packed_from: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token-level tensors; concatenate the rest (pixel_values, image_grid_thw, ...) along dim 0,
    from the rows that have them (a text row in a VLM batch adds no image tensors).
    packed_from (data.batching: packed; the architecture's first position id): one sequence of the rows end to end
    (collate_packed) instead."""
    import torch

    if packed_from is not None:
        return collate_packed(examples, packed_from)
    longest = max(len(e.input_ids) for e in examples)
    n = len(examples)
    batch = {
        "input_ids": torch.full((n, longest), pad_id, dtype=torch.long),
        "labels": torch.full((n, longest), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((n, longest), dtype=torch.long),
    }
    token_keys = [k for k in TOKEN_LEVEL_FILL if any(k in e.extras for e in examples)]
    for key in token_keys:
        batch[key] = torch.zeros((n, longest), dtype=next(e.extras[key].dtype for e in examples if key in e.extras))
    for j, e in enumerate(examples):
        length = len(e.input_ids)
        batch["input_ids"][j, :length] = e.input_ids
        batch["labels"][j, :length] = e.labels
        batch["attention_mask"][j, :length] = 1
        for key in token_keys:
            if key in e.extras:
                batch[key][j, :length] = e.extras[key]
            else:  # a text row beside image rows: prompt tokens 0, answer tokens as encode_row fills them
                batch[key][j, :length] = (e.labels != IGNORE_INDEX).long() * TOKEN_LEVEL_FILL[key]
    image_keys = dict.fromkeys(k for e in examples for k in e.extras if k not in TOKEN_LEVEL_FILL)
    for key in image_keys:
        batch[key] = cat_padded([e.extras[key] for e in examples if key in e.extras])
    return batch


def collate_packed(examples: list[Encoded], first_position: int) -> dict[str, torch.Tensor]:
    """The rows end to end as one sequence (a batch of one), without padding or attention_mask: position_ids restart
    at first_position with each row, which is how transformers tells the rows apart (masking_utils builds a
    block-diagonal causal mask from them; FlashAttention 2 runs them as variable-length sequences), and the
    label of each row's first token is ignored, so no row predicts the next one's start. Image tensors are
    concatenated as in collate; Qwen2-VL's 3-D positions are made per row on the worker (jobs/packing.py)."""
    import torch

    def token_level(key: str, e: Encoded) -> torch.Tensor:
        if key in e.extras:
            return e.extras[key]
        return (e.labels != IGNORE_INDEX).long() * TOKEN_LEVEL_FILL[key]  # a text row beside image rows, as collate

    labels = []
    for e in examples:
        row = e.labels.clone()
        row[0] = IGNORE_INDEX
        labels.append(row)
    batch = {
        "input_ids": torch.cat([e.input_ids for e in examples])[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([torch.arange(len(e.input_ids)) + first_position for e in examples])[None],
    }
    for key in (k for k in TOKEN_LEVEL_FILL if any(k in e.extras for e in examples)):
        dtype = next(e.extras[key].dtype for e in examples if key in e.extras)
        batch[key] = torch.cat([token_level(key, e).to(dtype) for e in examples])[None]
    image_keys = dict.fromkeys(k for e in examples for k in e.extras if k not in TOKEN_LEVEL_FILL)
    for key in image_keys:
        batch[key] = cat_padded([e.extras[key] for e in examples if key in e.extras])
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
