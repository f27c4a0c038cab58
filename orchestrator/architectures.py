"""What rayft knows per architecture: methods it supports, default LoRA targets, modules kept out of 4-bit.

Read from the model's config.json (`model_type`), without importing torch or transformers. Module names
are those of transformers 5 (`model.language_model...`, `model.vision_tower...`, `lm_head`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ATTN_MLP = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ALL_METHODS = ("full", "lora", "qlora")


class UnknownArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    kind: Literal["vlm", "text"]
    methods: tuple[str, ...]
    lora_targets: str
    """Regex (peft full-match) over module names: the language model's attention and MLP projections."""
    vision_lora_targets: str
    """Regex for the vision tower's projections (opt-in with lora.train_vision)."""
    keep_out_of_4bit: tuple[str, ...]
    """Module-name prefixes never quantized (bitsandbytes llm_int8_skip_modules matches from the start)."""
    vision_modules: tuple[str, ...]
    """Prefixes of the vision tower and projector."""
    note: str = ""
    max_images: int | None = None
    """Most images one row may hold (None: any number, each where its {"type": "image"} part is)."""
    components: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """The model's parts by the names a user writes (freeze, train.lr_groups): vision, projector, language, each
    as module-name prefixes; a weight belongs to the part with its longest matching prefix (Qwen2-VL's merger,
    the projector, sits inside its vision tower)."""
    packs: bool = True
    """data.batching: packed is correct here: rows concatenated without padding, positions restarting per row, no
    attention across rows (tests/test_packing.py checks each architecture against the same rows unpacked)."""
    first_position: int = 0
    """The position id of a row's first token (PaliGemma counts from 1)."""

    def component_of(self, name: str) -> str | None:
        """The component (vision, projector, language) holding parameter or module `name`; peft's wrapper prefix
        (base_model.model.) is ignored. None: in no component."""
        name = name.removeprefix("base_model.model.")
        found = [(len(prefix), part) for part, prefixes in self.components for prefix in prefixes
                 if name == prefix or name.startswith(prefix + ".")]
        return max(found)[1] if found else None

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(part for part, _ in self.components)

    def lora_target_regex(self, train_vision: bool) -> str:
        if train_vision and self.vision_lora_targets:
            return f"(?:{self.lora_targets})|(?:{self.vision_lora_targets})"
        return self.lora_targets


def _lm(prefix: str) -> str:
    return rf"{prefix}\.layers\.\d+\.(?:self_attn|mlp)\.{ATTN_MLP}"


def _vit(prefix: str) -> str:
    """The encoder layers of a SigLIP/CLIP/Idefics3 vision tower. Not `prefix.*`: SigLIP's pooling `head`
    (an nn.MultiheadAttention, which never calls its out_proj, and an MLP) is unread by LLaVA and PaliGemma,
    so LoRA there would add parameters that never get a gradient."""
    projections = r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
    return rf"{prefix}\.encoder\.layers\.\d+\.{projections}"


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llava",
        model_types=("llava",),
        kind="vlm",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model\.language_model"),
        vision_lora_targets=_vit(r"model\.vision_tower"),
        keep_out_of_4bit=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        vision_modules=("model.vision_tower", "model.multi_modal_projector"),
        components=(("vision", ("model.vision_tower",)), ("projector", ("model.multi_modal_projector",)), ("language", ("model.language_model", "lm_head"))),
        # processor: LlavaProcessor expands <image> to (image_size/patch_size)^2 tokens (+1 with a CLS token)
    ),
    Architecture(
        name="idefics3",
        model_types=("idefics3",),
        kind="vlm",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model\.text_model"),
        vision_lora_targets=_vit(r"model\.vision_model"),
        keep_out_of_4bit=("model.vision_model", "model.connector", "lm_head"),
        vision_modules=("model.vision_model", "model.connector"),
        components=(("vision", ("model.vision_model",)), ("projector", ("model.connector",)), ("language", ("model.text_model", "lm_head"))),
        # processor: the tokenizer must hold <fake_token_around_image>, <image>, <end_of_utterance>, <global-img> and
        # <row_i_col_j>; tiny models use do_image_splitting=False
    ),
    Architecture(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        kind="vlm",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model\.language_model"),
        vision_lora_targets=r"model\.visual\.blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
        keep_out_of_4bit=("model.visual", "lm_head"),
        vision_modules=("model.visual",),
        components=(("vision", ("model.visual",)), ("projector", ("model.visual.merger",)), ("language", ("model.language_model", "lm_head"))),
        # processor: without torchvision, stock checkpoints load through an image-only subclass of the processor
        # (jobs/model.py); it returns image_grid_thw and mm_token_type_ids, both passed to the model
    ),
    Architecture(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        kind="vlm",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model\.language_model"),
        vision_lora_targets=r"model\.visual\.blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)",
        keep_out_of_4bit=("model.visual", "lm_head"),
        vision_modules=("model.visual",),
        components=(("vision", ("model.visual",)), ("projector", ("model.visual.merger",)), ("language", ("model.language_model", "lm_head"))),
        # processor: as qwen2_vl
    ),
    Architecture(
        name="paligemma",
        model_types=("paligemma",),
        kind="vlm",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model\.language_model"),
        vision_lora_targets=_vit(r"model\.vision_tower"),
        keep_out_of_4bit=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        vision_modules=("model.vision_tower", "model.multi_modal_projector"),
        components=(("vision", ("model.vision_tower",)), ("projector", ("model.multi_modal_projector",)), ("language", ("model.language_model", "lm_head"))),
        # processor: it adds 1152 <loc>/<seg> tokens (size the vocabulary from len(tokenizer)); no chat
        # template: one user message (its image tokens first) and the answer as the suffix
        max_images=1,
        first_position=1,
    ),
    Architecture(
        name="nvila_lite",
        model_types=("nvila_lite", "nvila"),
        kind="vlm",
        methods=("full",),
        lora_targets="",
        vision_lora_targets="",
        keep_out_of_4bit=(),
        vision_modules=("vision_tower", "mm_projector"),
        components=(("vision", ("vision_tower",)), ("projector", ("mm_projector",)), ("language", ("llm",))),
        note="NVILA-Lite supports full fine-tuning only",
        packs=False,  # its remote model code is not in transformers: packing cannot be checked against it
    ),
    Architecture(
        name="llama",
        model_types=("llama",),
        kind="text",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model"),
        vision_lora_targets="",
        keep_out_of_4bit=("lm_head",),
        vision_modules=(),
        components=(("language", ("model", "lm_head")),),
    ),
    Architecture(
        name="qwen2",
        model_types=("qwen2",),
        kind="text",
        methods=ALL_METHODS,
        lora_targets=_lm(r"model"),
        vision_lora_targets="",
        keep_out_of_4bit=("lm_head",),
        vision_modules=(),
        components=(("language", ("model", "lm_head")),),
    ),
)


def for_model_type(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(a.name for a in ARCHITECTURES)
    raise UnknownArchitecture(f"architecture `{model_type}` is not in rayft's capability matrix (known: {known})")


def read_model_type(model_dir: str | Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("model_type", ""))


def for_model_dir(model_dir: str | Path) -> Architecture:
    return for_model_type(read_model_type(model_dir))
