"""Tiny models and synthetic data built offline from configs (no hub): the quickstart's and the tests' material.

The colour task: a coloured shape on a grey 64x64 background; "what colour is the shape ?". The base
learns to answer in English; the quickstart's adaptation task asks for the answer in French, which the
base has never produced. Both are learnable in a few hundred steps by a ~200k-parameter LLaVA.
"""

from __future__ import annotations

import functools
import io
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    "shape": "what is the shape ?",  # answered with the shape's name (square / circle / triangle)
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


def build_tokenizer(
    extra_specials: Sequence[str] = (), image_token: str = "<image>", chat_template: str | None = CHAT_TEMPLATE
):
    """The WordLevel tokenizer of the colour task. extra_specials: an architecture's own markers (image
    delimiters, ...), appended after SPECIALS and registered as special so they split out of unspaced text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _vocabulary()
    vocab = {w: i for i, w in enumerate(SPECIALS + list(extra_specials) + words[len(SPECIALS) :])}
    if image_token not in vocab:
        raise ValueError(f"image token {image_token} is not in the vocabulary; add it to extra_specials")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": image_token},
        chat_template=chat_template,
        padding_side="right",
    )
    if extra_specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_specials)})
    return tokenizer


def build_tiny_llava(
    model_dir: str | Path,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
    vision_hidden: int | None = None,
    vision_layers: int | None = None,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    vocab: int | None = None,
) -> Path:
    """A LLaVA-style VLM (SigLIP vision + Qwen2 text) with random weights, saved with its processor.
    vocab: the text model's vocabulary (default: the tokenizer's ~40 words; e.g. Qwen2's 151,646, whose embedding and
    head then cost what a real one does, though only the tokenizer's ids ever occur).
    The text model is hidden x layers with an MLP of `intermediate` (default 2 x hidden); the vision
    tower is as wide and deep as the text model unless vision_hidden / vision_layers say otherwise.
    image_size / patch_size: the SigLIP geometry ((image_size // patch_size)^2 image tokens a row;
    384 / 14 gives the 729 of LLaVA/PaliGemma-class models)."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    out = Path(model_dir)
    tokenizer = build_tokenizer()
    image_processor = SiglipImageProcessorPil(  # PIL backend: no torchvision needed
        size={"height": image_size, "width": image_size}, do_resize=True, do_normalize=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    vision_hidden = vision_hidden or hidden
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers or layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,  # LLaVA reads patch features; the pooling head would be an unused parameter
    )
    text = Qwen2Config(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(512, (image_size // patch_size) ** 2 + 256),
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


# The other architectures of the capability matrix, as small as they go (32-pixel images, 8-pixel patches),
# each with its own processor class so that AutoProcessor / AutoModelForImageTextToText load the saved
# directory exactly as they load a real checkpoint.
SMALL_IMAGE = 32
SMALL_PATCH = 8
IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]
QWEN_VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _small_text(tokenizer: Any, hidden: int, layers: int) -> dict[str, Any]:
    """Decoder settings shared by the tiny VLMs; token ids from the tokenizer (config defaults lie outside it)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        # 0.02 suits widths in the thousands; at width 32 it leaves every logit near 0, and a frozen head that
        # small caps how far adapters can lower the loss (measured: 4.3 -> 3.8 in 25 LoRA steps; 4.4 -> 0.4 here).
        "initializer_range": hidden**-0.5,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _small_vit(hidden: int, layers: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "image_size": SMALL_IMAGE,
        "patch_size": SMALL_PATCH,
    }


def _save(model: Any, processor: Any, model_dir: str | Path) -> Path:
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_idefics3(
    model_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 1, image_splitting: bool = False
) -> Path:
    """Idefics3 (SigLIP-like vision + pixel-shuffle connector + Llama text). image_splitting: as the released
    checkpoints do, resize the longest edge to 64 and cut 32x32 crops (up to 2x2) plus a global image."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    tokenizer = build_tokenizer(IDEFICS3_SPECIALS)
    scale_factor = 2  # the connector's pixel shuffle: (32/8)^2 patches -> 4 image tokens
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=image_splitting,
        size={"longest_edge": 2 * SMALL_IMAGE if image_splitting else SMALL_IMAGE},
        max_image_size={"longest_edge": SMALL_IMAGE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(SMALL_IMAGE // SMALL_PATCH) ** 2 // scale_factor**2,
        chat_template=CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_small_vit(hidden, layers)),
        text_config=LlamaConfig(**_small_text(tokenizer, hidden, layers)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return _save(Idefics3ForConditionalGeneration(config), processor, model_dir)


def build_tiny_text(model_dir: str | Path, arch: str = "llama", seed: int = 0, hidden: int = 32, layers: int = 2, max_shard_size: str | None = None) -> Path:
    """A text-only decoder (Llama or Qwen2) over the colour task's tokenizer, random weights, saved with the
    tokenizer; max_shard_size (e.g. "200MB") saves it in several safetensors shards, as hub checkpoints are."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_small_text(tokenizer, hidden, layers)))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out)
    return out


@functools.cache
def qwen2_vl_image_processor_class() -> type:
    """Qwen2VLProcessor without its video processor, which needs torchvision (not installable here);
    registered with AutoProcessor for Qwen2-VL configs (jobs/model.py)."""
    from jobs.model import qwen2_vl_image_only_processor

    return qwen2_vl_image_only_processor("qwen2_vl")


def build_tiny_qwen2_vl(model_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 1, version: str = "qwen2_vl") -> Path:
    """Qwen2-VL (ViT with 2x2 patch merger + Qwen2 text with multimodal RoPE); images resized to 32x32.
    version qwen2_5_vl: Qwen2.5-VL (its windowed ViT with a SwiGLU MLP; the same merger, processor and M-RoPE)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    tokenizer = build_tokenizer(
        QWEN_VL_SPECIALS, image_token="<|image_pad|>", chat_template=CHAT_TEMPLATE.replace("<image>", image_text)
    )
    merge = 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=SMALL_PATCH, merge_size=merge, min_pixels=SMALL_IMAGE**2 // 4, max_pixels=SMALL_IMAGE**2
    )
    from jobs.model import qwen2_vl_image_only_processor

    processor = qwen2_vl_image_only_processor(version)(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    head_dim = hidden // 4
    text = _small_text(tokenizer, hidden, layers)
    # mrope_section splits head_dim/2 rotary frequencies over (time, height, width).
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}
    vision = {
        "depth": layers,
        "embed_dim": hidden,
        "hidden_size": hidden,  # the merger's output: the text model's width
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": SMALL_PATCH,
        "spatial_merge_size": merge,
    }
    config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if version == "qwen2_5_vl":
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = {"depth": layers, "hidden_size": hidden, "out_hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": 4,
                  "patch_size": SMALL_PATCH, "spatial_merge_size": merge, "window_size": 2 * SMALL_PATCH * merge, "fullatt_block_indexes": [0]}
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return as_stock_qwen2_vl(_save(model_class(config), processor, model_dir), "Qwen2_5_VLProcessor" if version == "qwen2_5_vl" else "Qwen2VLProcessor")


def as_stock_qwen2_vl(model_dir: Path, processor_class: str = "Qwen2VLProcessor") -> Path:
    """Rewrite processor_config.json as stock transformers 5 writes a Qwen2-VL checkpoint's (the stock class,
    with its video processor nested), which cannot be saved here: the video processor needs torchvision.
    AutoProcessor then fails on it without torchvision, exactly as on a released checkpoint."""
    path = model_dir / "processor_config.json"
    config = json.loads(path.read_text())
    image = config["image_processor"]
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    video.update(video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False, fps=2.0, min_frames=4, max_frames=768)
    path.write_text(json.dumps({"image_processor": image, "processor_class": processor_class, "video_processor": video}, indent=2) + "\n")
    return model_dir


def build_tiny_paligemma(model_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """PaliGemma (SigLIP + Gemma text). No chat template, like the released checkpoints: the processor
    writes the prefix itself (image tokens, bos, prompt, newline)."""
    import torch
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(chat_template=None)
    image_processor = SiglipImageProcessorPil(
        size={"height": SMALL_IMAGE, "width": SMALL_IMAGE}, image_seq_length=(SMALL_IMAGE // SMALL_PATCH) ** 2
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds 1152 <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_small_vit(hidden, layers), vision_use_head=False),
        text_config=GemmaConfig(**_small_text(tokenizer, hidden, layers), head_dim=hidden // 4),
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        projection_dim=hidden,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return _save(PaliGemmaForConditionalGeneration(config), processor, model_dir)


TINY_VLMS: dict[str, Callable[..., Path]] = {
    "llava": build_tiny_llava,
    "idefics3": build_tiny_idefics3,
    "qwen2_vl": build_tiny_qwen2_vl,
    "paligemma": build_tiny_paligemma,
}
"""Tiny model builders by architecture name (orchestrator.architectures); each saves model + processor."""


def draw_shape(colour: str, shape: str, rng: random.Random, image_size: int = IMAGE_SIZE) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    rgb = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour][0])
    size = rng.randint(18, 34) * image_size // IMAGE_SIZE
    x, y = rng.randint(2, image_size - size - 2), rng.randint(2, image_size - size - 2)
    if shape == "square":
        draw.rectangle((x, y, x + size, y + size), fill=rgb)
    elif shape == "circle":
        draw.ellipse((x, y, x + size, y + size), fill=rgb)
    else:
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _answer(task: str, colour: str, shape: str) -> str:
    if task == "shape":
        return shape
    return colour if task == "english" else COLOURS[colour][1]


def colour_rows(n: int, task: str = "english", seed: int = 0, image_size: int = IMAGE_SIZE) -> list[dict]:
    """n rows of {image (PNG bytes), question, answer}, balanced over colours; task "shape" asks for the
    drawn shape instead of its colour (the same images for the same seed)."""
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = names[i % len(names)]
        shape = rng.choice(SHAPES)
        image = draw_shape(colour, shape, rng, image_size)
        rows.append({"image": image, "question": QUESTIONS[task], "answer": _answer(task, colour, shape)})
    rng.shuffle(rows)
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def as_chat(row: dict) -> dict:
    """A colour row in the standard chat layout: content parts and an images list column."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": row["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
        ],
        "images": [{"bytes": row["image"], "path": None}],
    }


def write_chat_parquet(rows: list[dict], path: str | Path) -> Path:
    """Chat rows ({messages, images}) written with the schema Hugging Face `datasets` gives such a set:
    messages as list<struct<role, content: list<struct<type, text>>>> (every part has every key, null where
    unused) and images as list<struct<bytes: binary, path: string>> (its Image feature's storage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    schema = pa.schema(
        [
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))),
            ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ]
    )
    rows = [{"messages": r["messages"], "images": [{"bytes": i.get("bytes"), "path": i.get("path")} for i in r.get("images") or []]} for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def chat_colour_job(arch: str, method: str, root: Path, epochs: int, lr: float, **sections: Any) -> dict[str, Any]:
    """A raw job training a tiny `arch` from random init on the colour task in the chat layout (512 train /
    128 held-out rows under root, as HF datasets writes them); sections: top-level keys merged in
    (quantization, lora, ...)."""
    model = TINY_VLMS[arch](root / "init")
    train = write_chat_parquet([as_chat(r) for r in colour_rows(512, seed=0)], root / "train.parquet")
    evals = write_chat_parquet([as_chat(r) for r in colour_rows(128, seed=1)], root / "eval.parquet")
    return {
        "name": f"chat-{arch}-{method}", "model": str(model), "method": method, "precision": "bf16", "output": str(root / "runs"),
        "data": {"train": str(train), "eval": str(evals), "messages": "messages", "images": "images", "max_length": 64},
        "train": {"micro_batch_size": 16, "epochs": epochs, "lr": lr, "eval_every": 32, "checkpoint_every": 64},
        **sections,
    }


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


def write_colour_data(data_dir: str | Path, task: str, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    out = Path(data_dir)
    return {
        "train": write_parquet(colour_rows(n_train, task, seed), out / f"{task}_train.parquet"),
        "eval": write_parquet(colour_rows(n_eval, task, seed + 10_000), out / f"{task}_eval.parquet"),
    }
