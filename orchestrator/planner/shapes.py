"""Model shapes: every parameter tensor of a model, read from its config.json, one section per architecture
family (Llama-style decoders; CLIP / SigLIP / Idefics3 and Qwen-VL vision towers; the projectors of llava,
idefics3 and paligemma), plus Llama-shaped configs for nominal sizes (`--model 7B`).

Parameter names are generated as transformers names the modules, so the LoRA target regex of
orchestrator/architectures.py selects exactly the Linears peft would adapt (lora_target_tensors).
No bytes here: what the tensors cost is orchestrator/planner/memory.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import architectures
from orchestrator.config import JobConfig

# `--model 7B`: Llama-shaped configs for nominal sizes (the published configs of these checkpoints).
# fmt: off
_LLAMA = {"model_type": "llama"}
SIZES: dict[str, dict[str, Any]] = {
    "1B": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "3B": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "7B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "8B": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "13B": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
    "70B": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000},
}
SIZE_NAMES = {"1B": "Llama-3.2-1B", "3B": "Llama-3.2-3B", "7B": "Llama-2-7B", "8B": "Llama-3-8B", "13B": "Llama-2-13B", "70B": "Llama-2-70B"}

# transformers' defaults for the keys a config.json may leave out, by (sub-)config model_type.
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "tie_word_embeddings": False},
    "gemma": {"vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
              "num_attention_heads": 16, "head_dim": 256, "tie_word_embeddings": True},
    "qwen2_vl_text": {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False},
}
_TEXT_DEFAULTS["qwen2_5_vl_text"] = _TEXT_DEFAULTS["qwen2_vl_text"]
_QKV_BIAS = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")  # Qwen: biases on q, k, v (not o)
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "image_size": 224, "patch_size": 32},
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16},
    "idefics3_vision": {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "image_size": 224, "patch_size": 32},
    "qwen2_vl": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "patch_size": 14},
    "qwen2_5_vl": {"depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "out_hidden_size": 3584, "patch_size": 14},
}
# fmt: on


class PlanError(ValueError):
    """The planner cannot model this model (unknown architecture, no config.json, unknown size)."""



@dataclass(frozen=True)
class Tensor:
    name: str
    """Parameter name as transformers 5 names it (`model.language_model.layers.0.self_attn.q_proj.weight`)."""
    numel: int
    linear: tuple[int, int] | None = None
    """(in_features, out_features) when this is an nn.Linear weight."""

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Stack:
    """A stack of identical blocks (the decoder, or a vision encoder): the widths the memory model reads."""

    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    layers: int
    gated_mlp: bool

    def layer_params(self) -> int:
        """Weights of one block's projections (what ZeRO-3 gathers to run it)."""
        mlp = 3 if self.gated_mlp else 2
        return (
            2 * self.hidden * self.q_dim
            + 2 * self.hidden * self.kv_dim
            + mlp * self.hidden * self.intermediate
        )


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    tensors: tuple[Tensor, ...]
    text: Stack
    vocab: int
    vision: Stack | None = None
    vision_prefix: str = ""
    image_tokens: int | None = None
    """Tokens the vision encoder sees per image; None for dynamic resolution (Qwen-VL)."""
    patches_per_token: int = 1
    """Dynamic resolution: vision patches per image token in the text (spatial_merge_size^2)."""
    patch_size: int | None = None
    """Dynamic resolution: the vision encoder's patch side in pixels (data.max_pixels caps its patches per image)."""
    name: str = ""

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)


def _filled(
    sub: dict[str, Any] | None, defaults: dict[str, dict[str, Any]], model_type: str
) -> dict[str, Any]:
    sub = dict(sub or {})
    kind = sub.get("model_type", model_type)
    if kind not in defaults:
        raise PlanError(f"the planner does not know sub-model type `{kind}`")
    return {**defaults[kind], "model_type": kind, **sub}


def _linear(module: str, fan_in: int, fan_out: int, bias: bool) -> list[Tensor]:
    out = [Tensor(f"{module}.weight", fan_in * fan_out, (fan_in, fan_out))]
    return out + [Tensor(f"{module}.bias", fan_out)] if bias else out


def _decoder(prefix: str, t: dict[str, Any]) -> tuple[list[Tensor], Stack]:
    h, heads, n = t["hidden_size"], t["num_attention_heads"], t["num_hidden_layers"]
    head_dim = t.get("head_dim") or h // heads
    q, kv = heads * head_dim, t.get("num_key_value_heads", heads) * head_dim
    i = t["intermediate_size"]
    qkv_bias = t["model_type"] in _QKV_BIAS or t.get("attention_bias", False)
    o_bias = t.get("attention_bias", False)
    mlp_bias = t.get("mlp_bias", False)
    tensors = [Tensor(f"{prefix}.embed_tokens.weight", t["vocab_size"] * h)]
    for layer in range(n):
        p = f"{prefix}.layers.{layer}"
        tensors += _linear(f"{p}.self_attn.q_proj", h, q, qkv_bias)
        tensors += _linear(f"{p}.self_attn.k_proj", h, kv, qkv_bias)
        tensors += _linear(f"{p}.self_attn.v_proj", h, kv, qkv_bias)
        tensors += _linear(f"{p}.self_attn.o_proj", q, h, o_bias)
        tensors += _linear(f"{p}.mlp.gate_proj", h, i, mlp_bias)
        tensors += _linear(f"{p}.mlp.up_proj", h, i, mlp_bias)
        tensors += _linear(f"{p}.mlp.down_proj", i, h, mlp_bias)
        tensors += [
            Tensor(f"{p}.input_layernorm.weight", h),
            Tensor(f"{p}.post_attention_layernorm.weight", h),
        ]
    tensors.append(Tensor(f"{prefix}.norm.weight", h))
    return tensors, Stack(h, q, kv, i, n, gated_mlp=True)


def _vit(prefix: str, v: dict[str, Any]) -> tuple[list[Tensor], Stack, int]:
    """SigLIP / CLIP / Idefics3 vision encoders: (tensors, stack, tokens per image)."""
    h, i, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patch, channels = v["patch_size"], v.get("num_channels", 3)
    patches = (v["image_size"] // patch) ** 2
    clip = v["model_type"] == "clip_vision_model"
    e = f"{prefix}.embeddings"
    tensors = [Tensor(f"{e}.patch_embedding.weight", h * channels * patch * patch)]
    if clip:  # a class token, no patch bias, a LayerNorm before the encoder
        tensors += [
            Tensor(f"{e}.class_embedding", h),
            Tensor(f"{e}.position_embedding.weight", (patches + 1) * h),
        ]
        tensors += [Tensor(f"{prefix}.pre_layrnorm.weight", h), Tensor(f"{prefix}.pre_layrnorm.bias", h)]
    else:
        tensors += [
            Tensor(f"{e}.patch_embedding.bias", h),
            Tensor(f"{e}.position_embedding.weight", patches * h),
        ]
    for layer in range(n):
        p = f"{prefix}.encoder.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors += _linear(f"{p}.self_attn.{proj}", h, h, True)
        tensors += _linear(f"{p}.mlp.fc1", h, i, True) + _linear(f"{p}.mlp.fc2", i, h, True)
        tensors += [
            Tensor(f"{p}.{norm}.{w}", h)
            for norm in ("layer_norm1", "layer_norm2")
            for w in ("weight", "bias")
        ]
    tensors += [Tensor(f"{prefix}.post_layernorm.weight", h), Tensor(f"{prefix}.post_layernorm.bias", h)]
    if v["model_type"] == "siglip_vision_model" and v.get("vision_use_head", True):  # the pooling head
        hd = f"{prefix}.head"
        tensors += [
            Tensor(f"{hd}.probe", h),
            Tensor(f"{hd}.attention.in_proj_weight", 3 * h * h),
            Tensor(f"{hd}.attention.in_proj_bias", 3 * h),
        ]
        tensors += _linear(f"{hd}.attention.out_proj", h, h, True)
        tensors += [Tensor(f"{hd}.layernorm.weight", h), Tensor(f"{hd}.layernorm.bias", h)]
        tensors += _linear(f"{hd}.mlp.fc1", h, i, True) + _linear(f"{hd}.mlp.fc2", i, h, True)
    return tensors, Stack(h, h, h, i, n, gated_mlp=False), patches + (1 if clip else 0)


def _qwen_vit(prefix: str, v: dict[str, Any], version: str) -> tuple[list[Tensor], Stack, int]:
    """Qwen2-VL / Qwen2.5-VL vision: (tensors, stack, patches per image token)."""
    patch, merge = v["patch_size"], v.get("spatial_merge_size", 2)
    channels, temporal = v.get("in_channels", v.get("in_chans", 3)), v.get("temporal_patch_size", 2)
    qwen25 = version == "qwen2_5_vl"
    h = v["hidden_size"] if qwen25 else v["embed_dim"]
    i = v["intermediate_size"] if qwen25 else int(h * v["mlp_ratio"])
    out = v["out_hidden_size"] if qwen25 else v["hidden_size"]
    norm = ("weight",) if qwen25 else ("weight", "bias")  # RMSNorm in 2.5, LayerNorm in 2
    tensors = [Tensor(f"{prefix}.patch_embed.proj.weight", h * channels * temporal * patch * patch)]
    for layer in range(v["depth"]):
        p = f"{prefix}.blocks.{layer}"
        tensors += [Tensor(f"{p}.{n}.{w}", h) for n in ("norm1", "norm2") for w in norm]
        tensors += _linear(f"{p}.attn.qkv", h, 3 * h, True) + _linear(f"{p}.attn.proj", h, h, True)
        if qwen25:
            tensors += _linear(f"{p}.mlp.gate_proj", h, i, True) + _linear(f"{p}.mlp.up_proj", h, i, True)
            tensors += _linear(f"{p}.mlp.down_proj", i, h, True)
        else:
            tensors += _linear(f"{p}.mlp.fc1", h, i, True) + _linear(f"{p}.mlp.fc2", i, h, True)
    merged = h * merge * merge
    tensors += [Tensor(f"{prefix}.merger.ln_q.{w}", h) for w in norm]
    tensors += _linear(f"{prefix}.merger.mlp.0", merged, merged, True) + _linear(
        f"{prefix}.merger.mlp.2", merged, out, True
    )
    return tensors, Stack(h, h, h, i, v["depth"], gated_mlp=qwen25), merge * merge


def shape_from_config(config: dict[str, Any], name: str = "") -> ModelShape:
    """Every parameter of the model config.json describes, named as transformers names it."""
    model_type = config.get("model_type", "")
    try:
        arch = architectures.for_model_type(model_type)
    except architectures.UnknownArchitecture as e:
        raise PlanError(str(e)) from None
    if arch.kind == "text":
        text = _filled(config, _TEXT_DEFAULTS, model_type)
        tensors, stack = _decoder("model", text)
        tied = text["tie_word_embeddings"]
        shape = dict(model_type=model_type, text=stack, vocab=text["vocab_size"], name=name)
    else:
        tensors, shape, text = _vlm(arch.name, config)
        shape["name"] = name
        tied = config.get("tie_word_embeddings", text["tie_word_embeddings"])
    if not tied:
        tensors += _linear("lm_head", text["hidden_size"], text["vocab_size"], False)
    return ModelShape(tensors=tuple(tensors), **shape)


def _vlm(name: str, config: dict[str, Any]) -> tuple[list[Tensor], dict[str, Any], dict[str, Any]]:
    if name in ("qwen2_vl", "qwen2_5_vl"):
        # Hub checkpoints keep the text keys at the top level; transformers 5 writes a text_config.
        text = _filled(
            {**config.get("text_config", config), "model_type": f"{name}_text"},
            _TEXT_DEFAULTS,
            f"{name}_text",
        )
        vision = {**_VISION_DEFAULTS[name], **config.get("vision_config", {})}
        t_tensors, t_stack = _decoder("model.language_model", text)
        v_tensors, v_stack, per_token = _qwen_vit("model.visual", vision, name)
        shape = dict(
            model_type=name,
            text=t_stack,
            vocab=text["vocab_size"],
            vision=v_stack,
            vision_prefix="model.visual",
            patches_per_token=per_token,
            patch_size=vision["patch_size"],
        )
        return v_tensors + t_tensors, shape, text
    if "text_config" not in config or "vision_config" not in config:
        raise PlanError(f"{name} config.json without text_config and vision_config")
    text = _filled(config["text_config"], _TEXT_DEFAULTS, "llama")
    vision = _filled(config["vision_config"], _VISION_DEFAULTS, "clip_vision_model")
    text_prefix, vision_prefix = (
        ("model.text_model", "model.vision_model")
        if name == "idefics3"
        else ("model.language_model", "model.vision_tower")
    )
    v_tensors, v_stack, image_tokens = _vit(vision_prefix, vision)
    hv, ht = vision["hidden_size"], text["hidden_size"]
    if name == "llava":
        layers = config.get("vision_feature_layer", -2)
        fan_in = hv * (len(layers) if isinstance(layers, list) else 1)
        bias = config.get("multimodal_projector_bias", True)
        projector = _linear("model.multi_modal_projector.linear_1", fan_in, ht, bias)
        projector += _linear("model.multi_modal_projector.linear_2", ht, ht, bias)
    elif name == "idefics3":
        scale = config.get("scale_factor", 2)
        projector = _linear("model.connector.modality_projection.proj", hv * scale * scale, ht, False)
    elif name == "paligemma":
        out = vision.get("projection_dim", config.get("projection_dim", 2048))
        projector = _linear("model.multi_modal_projector.linear", hv, out, True)
    else:
        raise PlanError(f"the planner cannot count {name} parameters from config.json")
    t_tensors, t_stack = _decoder(text_prefix, text)
    shape = dict(
        model_type=name,
        text=t_stack,
        vocab=text["vocab_size"],
        vision=v_stack,
        vision_prefix=vision_prefix,
        image_tokens=image_tokens,
    )
    return v_tensors + projector + t_tensors, shape, text


def load_shape(model: str) -> ModelShape:
    """A model directory (its config.json) or a nominal size such as `7B`."""
    path = Path(model)
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), name=str(path))
    size = model.upper()
    if size in SIZES:
        return shape_from_config(SIZES[size], name=f"{size} ({SIZE_NAMES[size]}-shaped)")
    if path.is_dir():
        raise PlanError(f"{model} has no config.json")
    raise PlanError(
        f"{model}: neither a model directory with config.json nor a known size ({', '.join(SIZES)})"
    )


def lora_target_tensors(job: JobConfig, shape: ModelShape) -> list[Tensor]:
    """The Linear weights peft adapts: the architecture's regex (full match) or a list of name suffixes."""
    if job.lora.targets == "auto":
        regex = re.compile(
            architectures.for_model_type(shape.model_type).lora_target_regex(job.lora.train_vision)
        )
        return [
            t for t in shape.tensors if t.linear and t.name.endswith(".weight") and regex.fullmatch(t.module)
        ]
    suffixes = job.lora.targets
    return [
        t
        for t in shape.tensors
        if t.linear and any(t.module == s or t.module.endswith("." + s) for s in suffixes)
    ]
