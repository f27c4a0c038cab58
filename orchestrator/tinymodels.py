"""Tiny models and synthetic data built offline from configs (no hub): the quickstart's and the tests' material.

The colour task: a coloured shape on a grey 64x64 background; "what colour is the shape ?". The base
learns to answer in English; the quickstart's adaptation task asks for the answer in French, which the
base has never produced. Both are learnable in a few hundred steps by a ~200k-parameter LLaVA.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 30, 30), "rouge"),
    "green": ((30, 170, 40), "vert"),
    "blue": ((30, 60, 220), "bleu"),
    "yellow": ((235, 220, 30), "jaune"),
    "purple": ((140, 40, 170), "violet"),
    "pink": ((250, 130, 190), "rose"),
    "white": ((250, 250, 250), "blanc"),
    "black": ((10, 10, 10), "noir"),
}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = {
    "english": "what colour is the shape ?",
    "french": "what colour is the shape ? answer in french .",
}
IMAGE_SIZE = 64
PATCH_SIZE = 16
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _vocabulary() -> list[str]:
    words: set[str] = {"user", "assistant", "system"}
    for q in QUESTIONS.values():
        words.update(q.split())
    for name, (_, french) in COLOURS.items():
        words.update((name, french))
    words.update(SHAPES)
    return SPECIALS + sorted(words)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def build_tiny_llava(out_dir: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A LLaVA-style VLM (SigLIP vision + Qwen2 text) with random weights, saved with its processor."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    image_processor = SiglipImageProcessorPil(  # PIL backend: no torchvision needed
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True, do_normalize=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    vision = SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,  # LLaVA reads patch features; the pooling head would be an unused parameter
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def draw_shape(colour: str, shape: str, rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    rgb = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour][0])
    size = rng.randint(18, 34)
    x, y = rng.randint(2, IMAGE_SIZE - size - 2), rng.randint(2, IMAGE_SIZE - size - 2)
    if shape == "square":
        draw.rectangle((x, y, x + size, y + size), fill=rgb)
    elif shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=rgb)
    else:
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def colour_rows(n: int, task: str = "english", seed: int = 0) -> list[dict]:
    """n rows of {image (PNG bytes), question, answer}, balanced over colours."""
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = names[i % len(names)]
        answer = colour if task == "english" else COLOURS[colour][1]
        rows.append(
            {"image": draw_shape(colour, rng.choice(SHAPES), rng), "question": QUESTIONS[task], "answer": answer}
        )
    rng.shuffle(rows)
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl_with_image_files(rows: list[dict], path: str | Path) -> Path:
    """The other accepted layout: JSONL rows whose image column is a path relative to the JSONL file."""
    path = Path(path)
    img_dir = path.parent / (path.stem + "_images")
    img_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, row in enumerate(rows):
            (img_dir / f"{i}.png").write_bytes(row["image"])
            f.write(json.dumps({**row, "image": f"{img_dir.name}/{i}.png"}) + "\n")
    return path


def write_colour_data(out_dir: str | Path, task: str, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "train": write_parquet(colour_rows(n_train, task, seed), out / f"{task}_train.parquet"),
        "eval": write_parquet(colour_rows(n_eval, task, seed + 10_000), out / f"{task}_eval.parquet"),
    }
