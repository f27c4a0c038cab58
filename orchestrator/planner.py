"""Memory planner: bytes per GPU (or per CPU worker) for a job, predicted from config.json alone.

Pure Python on purpose (no torch, no transformers): `rayft plan` is instant and the fit check costs nothing
before `rayft train` / `rayft tune` launch.

The model, per worker:
  weights      every parameter by storage: fp32 4 B, bf16/fp16 2 B, NF4/FP4 0.5 B plus quantization constants
               (an fp32 absmax per 64 weights: 4.5 bits; double quantization: 8-bit absmax + an fp32 one per
               256 blocks: about 4.127 bits). Full fine-tuning without DeepSpeed keeps fp32 master weights
               (maths in the run's precision under autocast); DeepSpeed holds them in the run's precision.
  gradients    one per trainable parameter, in its storage dtype; DDP adds its bucket copy.
  optimizer    AdamW's two fp32 moments (8 B), plus fp32 master weights (4 B) where DeepSpeed holds the
               weights in 16 bits (and in every ZeRO stage >= 1, which keeps its own fp32 partition).
  ZeRO         stage 1 partitions optimizer state over N workers, 2 also gradients, 3 also weights;
               CPU offload moves optimizer state (and at stage 3 the weights) to host memory.
  activations  what autograd saves, per token and layer, from the layer's widths (SDPA attention, no
               attention matrix): decoder 6h + 3q + 2kv + 4i elements (RMSNorms keep an fp32 input, SwiGLU
               four i-wide tensors), ViT 11h + 2i; logits 10 B per vocabulary entry (16-bit); LoRA dropout adds a
               copy + mask of each adapted input (a 1-byte mask on CUDA, fp32 on CPU). Gradient checkpointing keeps each layer's input and one
               layer's activations. A frozen vision tower saves nothing. Full fine-tuning under autocast also
               keeps a 16-bit copy of every weight until backward.
  overhead     GPU: CUDA context and workspaces, plus allocator slack; CPU worker: the Python/torch/Ray
               runtime (measured). DeepSpeed adds its gradient reduce bucket, ZeRO-3 the gathered weights
               of the block running and the one prefetched.

Parameter counts are generated from config.json as transformers names the modules, so the LoRA target
regex of orchestrator/architectures.py selects exactly the Linears peft would adapt.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator import architectures
from orchestrator.config import JobConfig, apply_overrides, gpu_present, uses_gpu
from orchestrator.dotted import flatten
from orchestrator.dotted import get as dotted_get

GiB = 2**30
Device = Literal["gpu", "cpu"]

QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
NESTED_BLOCK = 256  # double quantization: absmax blocks per fp32 scale
CUDA_CONTEXT = int(0.5 * GiB)  # CUDA context, cuBLAS/NCCL workspaces (not seen by the caching allocator)
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a share of the tensors
# Python + torch + transformers + Ray in one CPU worker (bench/planner_calibration.py)
CPU_RUNTIME = int(1.0 * GiB)
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)

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


class DoesNotFit(RuntimeError):
    """A search none of whose trials is predicted to fit (the message says why and what would)."""


# ----------------------------------------------------------------------------------------------------
# Parameters from config.json


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
    """A stack of identical blocks (the decoder, or a vision encoder) as the activation model sees it."""

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

    def layer_elements(self) -> int:
        """Activation elements (16-bit) one layer saves for backward, per token."""
        if self.gated_mlp:  # RMSNorms (fp32 input + output), q/k/v/attn out/o_proj input, SwiGLU's four
            return 6 * self.hidden + 3 * self.q_dim + 2 * self.kv_dim + 4 * self.intermediate
        return (
            11 * self.hidden + 2 * self.intermediate
        )  # LayerNorms, q/k/v/out/out_proj input, fc1 out + GELU


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


def _under(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------------------------------
# Bytes per worker


def four_bit_bytes(numel: int, double_quant: bool) -> int:
    """Packed 4-bit weights plus bitsandbytes' quantization state for one Linear."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    packed, code = math.ceil(numel / 2), 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code  # fp32 absmax per block: 4.5 bits per weight
    # 8-bit absmax per block, an fp32 scale per 256 blocks, their 256-entry code and an offset: ~4.127 bits
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4 + code


@dataclass(frozen=True)
class Plan:
    label: str
    device: Device
    workers: int
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    offloaded: int = 0
    """Bytes per worker moved to host memory by DeepSpeed CPU offload (on a CPU run they stay in the total)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted job keys that turn the planned job into this configuration (empty for the job itself)."""

    @property
    def total(self) -> int:
        device = self.weights + self.gradients + self.optimizer + self.activations + self.overhead
        return device + (self.offloaded if self.device == "cpu" else 0)

    @property
    def states(self) -> int:
        """Weights + gradients + optimizer state, wherever they live (what calibration measures)."""
        return self.weights + self.gradients + self.optimizer + self.offloaded

    def as_dict(self) -> dict[str, Any]:
        keys = (
            "label",
            "device",
            "workers",
            "total_params",
            "trainable_params",
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "overhead",
            "offloaded",
            "overrides",
        )
        return {**{k: getattr(self, k) for k in keys}, "total": self.total}


def plan(
    job: JobConfig,
    shape: ModelShape,
    device: Device,
    label: str = "job",
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """Predicted bytes per worker for `job` on `device`."""
    arch = architectures.for_model_type(shape.model_type)
    ds = job.deepspeed
    workers = job.scaling.workers
    stage = ds.stage if ds else None
    precision_bytes = 2 if job.precision in ("bf16", "fp16") else 4
    adapters = job.method in ("lora", "qlora")

    # weights, and which parameters train
    if job.method == "full":
        stored = 4 if ds is None else precision_bytes  # fp32 master weights under autocast; DeepSpeed: 16-bit
        trainable = sum(t.numel for t in shape.tensors if not _under(t.name, job.freeze))
        weights = shape.total_params * stored
        trainable_bytes = stored
    else:
        targets = lora_target_tensors(job, shape)
        trainable = sum(job.lora.rank * (t.linear[0] + t.linear[1]) for t in targets if t.linear)
        weights = 0
        for t in shape.tensors:
            quantized = job.quantized and t.linear is not None and not _under(t.module, arch.keep_out_of_4bit)
            weights += (
                four_bit_bytes(t.numel, job.quantization.double_quant)
                if quantized
                else t.numel * precision_bytes
            )
        # peft keeps adapters in fp32; DeepSpeed casts them to the run's precision
        trainable_bytes = 4 if ds is None else precision_bytes
        weights += trainable * trainable_bytes

    gradients = trainable * trainable_bytes
    master = ds is not None and (stage >= 1 or precision_bytes == 2)
    optimizer = trainable * (8 + (4 if master else 0))
    if ds is None and workers > 1:
        gradients *= 2  # DDP's gradient buckets are a second copy
    offloaded = 0
    if stage is not None and stage >= 1:
        optimizer //= workers
    if stage is not None and stage >= 2:
        gradients //= workers
    if stage == 3:
        # adapter weights are not partitioned (lora under ZeRO-3 is refused); the base is
        weights //= workers
    if ds is not None and ds.offload_optimizer == "cpu":
        offloaded += optimizer + trainable * 4 // workers  # and DeepSpeedCPUAdam's fp32 gradient partition
        optimizer = 0
    if ds is not None and ds.offload_params == "cpu":
        offloaded += weights
        weights = 0

    activations = _activations(job, shape, precision_bytes)
    if adapters and job.lora.dropout > 0:
        # CUDA's fused dropout keeps a 1-byte mask; the CPU kernel a mask in the input's (the adapter's) dtype
        mask = 1 if device == "gpu" else trainable_bytes
        activations += _lora_dropout_bytes(job, shape, precision_bytes + mask)
    if job.method == "full" and ds is None and job.precision != "fp32":
        activations += 2 * sum(t.numel for t in shape.tensors if t.linear)  # autocast's 16-bit weight copies

    tensors = weights + gradients + optimizer + activations
    overhead = CUDA_CONTEXT + int(ALLOCATOR_SLACK * tensors) if device == "gpu" else CPU_RUNTIME
    if ds is not None:
        bucket = flatten(ds.overrides).get("zero_optimization.reduce_bucket_size", DS_REDUCE_BUCKET)
        overhead += min(int(bucket), trainable) * precision_bytes
    if stage == 3:  # the gathered parameters of the block running and the one prefetched
        largest = max(shape.text.layer_params(), shape.vocab * shape.text.hidden)
        overhead += 2 * largest * precision_bytes
    return Plan(
        label,
        device,
        workers,
        shape.total_params,
        trainable,
        weights,
        gradients,
        optimizer,
        activations,
        overhead,
        offloaded,
        dict(overrides or {}),
    )


def _activations(job: JobConfig, shape: ModelShape, element: int) -> int:
    tokens = job.train.micro_batch_size * job.data.max_length
    logits = tokens * shape.vocab * (element + 8)  # the logits, their fp32 upcast for the loss, log-softmax
    total = logits + _stack_bytes(shape.text, tokens, element, job.train.gradient_checkpointing)
    if shape.vision is not None and _vision_trains(job, shape):
        per_image = shape.image_tokens or shape.patches_per_token * job.data.max_length
        total += _stack_bytes(
            shape.vision, job.train.micro_batch_size * per_image, element, job.train.gradient_checkpointing
        )
    return total


def _stack_bytes(stack: Stack, tokens: int, element: int, checkpointing: bool) -> int:
    per_layer = stack.layer_elements() * tokens * element
    if checkpointing:  # each layer's input, and one layer recomputed at a time in backward
        return stack.layers * stack.hidden * tokens * element + per_layer
    return stack.layers * per_layer


def _vision_trains(job: JobConfig, shape: ModelShape) -> bool:
    """A frozen vision tower whose input needs no gradient saves nothing for backward."""
    if job.method == "full":
        return not _under(shape.vision_prefix, job.freeze)
    return job.lora.train_vision


def _lora_dropout_bytes(job: JobConfig, shape: ModelShape, per_element: int) -> int:
    """peft's dropout on each adapted input: a copy of the input (what the adapter's matmul saves) plus the
    dropout mask; per_element is the two together."""
    targets = lora_target_tensors(job, shape)
    per_token = sum(t.linear[0] * per_element for t in targets if t.linear)
    layers = shape.text.layers + (shape.vision.layers if shape.vision and job.lora.train_vision else 0)
    if job.train.gradient_checkpointing:
        per_token //= max(1, layers)
    tokens = job.train.micro_batch_size * job.data.max_length
    return per_token * tokens


# ----------------------------------------------------------------------------------------------------
# Alternatives and the recommendation


def describe(job: JobConfig) -> str:
    """A short name for a configuration: `qlora nf4+dq bf16`, `full bf16 ZeRO-3 x4 offload`, ..."""
    parts = [job.method]
    if job.quantized:
        parts.append(job.quantization.type + ("+dq" if job.quantization.double_quant else ""))
    parts.append(job.precision)
    if job.deepspeed:
        ds = job.deepspeed
        parts.append(f"ZeRO-{ds.stage} x{job.scaling.workers}")
        if ds.offload_optimizer == "cpu" or ds.offload_params == "cpu":
            parts.append(
                "offload "
                + "+".join(
                    k
                    for k, v in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params))
                    if v == "cpu"
                )
            )
    elif job.scaling.workers > 1:
        parts.append(f"DDP x{job.scaling.workers}")
    if job.train.gradient_checkpointing:
        parts.append("ckpt")
    parts.append(f"mb{job.train.micro_batch_size}")
    return " ".join(parts)


def _variant(job: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    return JobConfig.model_validate(apply_overrides(job.model_dump(mode="json"), overrides))


def _changes(job: JobConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change something in `job`."""
    current = job.model_dump(mode="json")
    out = {}
    for key, value in overrides.items():
        if dotted_get(current, key) != value:
            out[key] = value
    return out


_FULL = {"method": "full", "quantization.type": "none"}
_ADAPTERS = {"deepspeed": None, "freeze": []}


def alternatives(gpus: int) -> list[dict[str, Any]]:
    """What `rayft plan` compares the job with, as overrides of the job: full fine-tuning, full + ZeRO-3
    over `gpus` workers (also with CPU offload), LoRA, QLoRA NF4."""
    zero3 = {
        **_FULL,
        "deepspeed.stage": 3,
        "deepspeed.offload_optimizer": "none",
        "deepspeed.offload_params": "none",
        "scaling.workers": gpus,
    }
    return [
        {**_FULL, "deepspeed": None},
        zero3,
        {**zero3, "deepspeed.offload_optimizer": "cpu", "deepspeed.offload_params": "cpu"},
        {"method": "lora", "quantization.type": "none", **_ADAPTERS},
        {"method": "qlora", "quantization.type": "nf4", **_ADAPTERS},
    ]


def _ladder(job: JobConfig, gpus: int) -> Iterator[dict[str, Any]]:
    """Changes to try, cheapest first: keep the method and maths and trade memory for compute (gradient
    checkpointing, a smaller micro batch with more accumulation: the same global batch); then shard full
    fine-tuning with ZeRO (and offload to host memory); then adapters; then adapters over a 4-bit base."""
    structures: list[dict[str, Any]] = [{}]
    if job.method == "full":
        zero = {"scaling.workers": gpus} if gpus > 1 else {}
        if gpus > 1:
            structures += [{**zero, "deepspeed.stage": 2}, {**zero, "deepspeed.stage": 3}]
        structures.append(
            {
                **zero,
                "deepspeed.stage": 3,
                "deepspeed.offload_optimizer": "cpu",
                "deepspeed.offload_params": "cpu",
            }
        )
        structures.append({"method": "lora", "quantization.type": "none", **_ADAPTERS})
    if job.method != "qlora":
        structures.append({"method": "qlora", "quantization.type": "nf4", **_ADAPTERS})
    batch = job.train.micro_batch_size * job.train.grad_accum
    memory = [
        {},
        {"train.gradient_checkpointing": True},
        {"train.gradient_checkpointing": True, "train.micro_batch_size": 1, "train.grad_accum": batch},
    ]
    for structure in structures:
        for saving in memory:
            yield {**structure, **saving}


@dataclass(frozen=True)
class Budget:
    """Memory to plan against: per GPU, or host memory for the CPU workers on this node."""

    device: Device
    memory: int | None
    source: str
    per_worker: bool = False
    """memory is already per worker (an explicit limit); otherwise CPU host memory is split among workers."""
    host: int | None = None
    """GPU runs: host memory available on the node, for what CPU offload moves there (None: not checked)."""

    def for_workers(self, workers: int) -> int | None:
        if self.memory is None or self.device == "gpu" or self.per_worker:
            return self.memory
        return self.memory // workers


def fits(p: Plan, budget: Budget) -> bool:
    available = budget.for_workers(p.workers)
    if budget.device == "gpu" and budget.host is not None and p.offloaded * p.workers > budget.host:
        return False  # CPU offload needs the host memory too
    return available is None or p.total <= available


def recommend(job: JobConfig, shape: ModelShape, budget: Budget, gpus: int | None = None) -> Plan | None:
    """The cheapest configuration predicted to fit (the job itself when it fits), or None."""
    gpus = gpus or job.scaling.workers
    seen = set()
    for overrides in _ladder(job, gpus):
        changes = _changes(job, overrides)
        key = json.dumps(changes, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        candidate = _variant(job, changes)
        p = plan(candidate, shape, budget.device, describe(candidate), changes)
        if fits(p, budget):
            return p
    return None


def set_flags(overrides: dict[str, Any]) -> str:
    """`--set key=value ...` for a change, as a user would type it."""
    return " ".join(
        f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()
    )


def change_text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items())


# ----------------------------------------------------------------------------------------------------
# Memory available, and the fit check


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_memory() -> tuple[int, int] | None:
    """(GPUs, smallest total memory in bytes) from nvidia-smi; never imports torch."""
    if not gpu_present():
        return None
    try:
        out = subprocess.run(
            [
                shutil.which("nvidia-smi") or "nvidia-smi",
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        sizes = [int(float(x)) * 2**20 for x in out.split() if x.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return (len(sizes), min(sizes)) if sizes else None


def budget_for(job: JobConfig, limit: int | None = None, concurrent: int = 1, source: str = "--memory-limit") -> Budget:
    """What a job's workers may use on this machine: an explicit per-worker limit (named by `source` in
    messages), the GPU's memory, or host memory (MemAvailable) shared by the workers (of `concurrent` trials)
    on this node."""
    use_gpu = uses_gpu(job)
    device: Device = "gpu" if use_gpu else "cpu"
    if limit is not None:
        return Budget(device, limit, source, per_worker=True)
    if use_gpu:
        found = gpu_memory()
        return Budget(
            "gpu",
            found[1] if found else None,
            "nvidia-smi memory.total" if found else "unknown (nvidia-smi gave no memory)",
            host=host_available(),
        )
    host = host_available()
    if host is None:
        return Budget("cpu", None, "unknown (no /proc/meminfo)")
    source = f"host MemAvailable {host / GiB:.1f} GiB" + (
        f" / {concurrent} concurrent trials" if concurrent > 1 else ""
    )
    return Budget("cpu", host // concurrent, source)


def _split(budget: Budget, workers: int) -> str:
    shared = budget.device == "cpu" and not budget.per_worker and budget.memory is not None and workers > 1
    return f" / {workers} workers" if shared else ""


@dataclass(frozen=True)
class Verdict:
    fits: bool
    message: str
    """Why it does not fit and the cheapest change that would, or a warning when no check was possible."""
    plan: Plan | None = None
    fix: Plan | None = None


def check(job: JobConfig, budget: Budget) -> Verdict:
    """The fit check `rayft train` and `rayft tune` run before anything launches."""
    try:
        shape = load_shape(job.model)
    except PlanError as e:
        return Verdict(True, f"memory planner: {e}; fit check skipped")
    available = budget.for_workers(job.scaling.workers)
    if available is None:
        return Verdict(True, f"memory planner: memory available is {budget.source}; fit check skipped")
    p = plan(job, shape, budget.device)
    if fits(p, budget):
        return Verdict(True, "", p)
    where = "per GPU" if budget.device == "gpu" else "per CPU worker"
    message = (
        f"predicted {p.total / GiB:.2f} GiB {where} ({describe(job)}), {available / GiB:.2f} GiB available "
        f"({budget.source}{_split(budget, job.scaling.workers)})"
    )
    if p.total <= available:  # the device fits; the host memory CPU offload needs does not
        message += f"; CPU offload needs {p.offloaded * p.workers / GiB:.2f} GiB of host memory, {(budget.host or 0) / GiB:.2f} GiB available"
    fix = recommend(job, shape, budget)
    if fix is None:
        message += "; no configuration rayft knows fits: use a larger device or more workers"
    else:
        message += (
            f"\ncheapest change that fits: set {change_text(fix.overrides)} "
            f"(predicted {fix.total / GiB:.2f} GiB)\n  e.g. {set_flags(fix.overrides)}"
        )
    return Verdict(False, message, p, fix)


# ----------------------------------------------------------------------------------------------------
# `rayft plan`


@dataclass(frozen=True)
class Comparison:
    job: JobConfig
    shape: ModelShape
    budget: Budget
    rows: list[Plan]
    """The job first, then the alternatives (full, full + ZeRO-3, + offload, lora, qlora nf4)."""
    recommended: Plan | None


def compare(job: JobConfig, shape: ModelShape, budget: Budget, gpus: int | None = None) -> Comparison:
    gpus = gpus or job.scaling.workers
    rows = [plan(job, shape, budget.device, f"job: {describe(job)}")]
    for overrides in alternatives(gpus):
        changes = _changes(job, overrides)
        if changes:
            variant = _variant(job, changes)
            rows.append(plan(variant, shape, budget.device, describe(variant), changes))
    return Comparison(job, shape, budget, rows, recommend(job, shape, budget, gpus))


UNITS = {"GiB": GiB, "GB": 10**9, "MiB": 2**20}


def render(c: Comparison, units: str = "GiB") -> str:
    scale = UNITS[units]
    job, shape, budget = c.job, c.shape, c.budget
    n = shape.total_params
    text = shape.text
    lines = [
        f"model: {shape.name or job.model} ({shape.model_type}, {_count(n)} parameters; text {text.hidden} wide x "
        f"{text.layers} layers, vocab {shape.vocab}"
        + (f"; vision {shape.vision.hidden} wide x {shape.vision.layers} layers" if shape.vision else "")
        + ")"
    ]
    where = "per GPU" if budget.device == "gpu" else "per CPU worker"
    available = budget.for_workers(job.scaling.workers)
    shown = "unknown" if available is None else f"{available / scale:.2f} {units}"
    split = _split(budget, job.scaling.workers)
    lines.append(f"memory {where}: {shown} ({budget.source}{split})")
    lora = f"LoRA rank {job.lora.rank} (dropout {job.lora.dropout}) on " + (
        "the architecture's default targets" if job.lora.targets == "auto" else ", ".join(job.lora.targets)
    )
    lines.append(
        f"assumptions: micro batch {job.train.micro_batch_size} x {job.data.max_length} tokens (image tokens included), "
        f"precision {job.precision}, gradient checkpointing {'on' if job.train.gradient_checkpointing else 'off'}, {lora}, AdamW"
    )
    storage = [
        ("fp32", n * 4),
        ("bf16/fp16", n * 2),
        ("nf4 (4.5 bits)", _all_4bit(shape, False)),
        ("nf4 + double quant (~4.127 bits)", _all_4bit(shape, True)),
    ]
    lines.append(
        "weights by storage (every parameter): "
        + " | ".join(f"{k} {v / scale:.2f} {units}" for k, v in storage)
    )
    lines.append("")
    header = [
        "configuration",
        "trainable",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "overhead",
        "host",
        "total",
        "fits",
    ]
    table = [header]
    for p in c.rows:
        ok = fits(p, budget)
        table.append(
            [
                p.label,
                f"{_count(p.trainable_params)} ({p.trainable_params / n:.2%})",
                *(
                    f"{b / scale:.2f}"
                    for b in (p.weights, p.gradients, p.optimizer, p.activations, p.overhead)
                ),
                f"{p.offloaded / scale:.2f}" if p.offloaded else "-",
                f"{p.total / scale:.2f}",
                "?" if available is None else ("yes" if ok else "no"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        lines.append(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        f"({units} per {'GPU' if budget.device == 'gpu' else 'worker'}; host: moved to host memory by CPU offload"
        + (", included in the total on CPU workers)" if budget.device == "cpu" else ")")
    )
    lines.append("")
    r = c.recommended
    if available is None:
        lines.append("recommendation: none (memory available is unknown; pass --gpu-mem)")
    elif r is None:
        lines.append("recommendation: nothing rayft knows fits; use a larger device or more workers (--gpus)")
    elif not r.overrides:
        lines.append(
            f"recommendation: the job as it is ({r.total / scale:.2f} of {available / scale:.2f} {units})"
        )
    else:
        lines.append(
            f"recommendation: {r.label}: set {change_text(r.overrides)} ({r.total / scale:.2f} {units} predicted)"
        )
        lines.append(f"  {set_flags(r.overrides)}")
    return "\n".join(lines)


def _all_4bit(shape: ModelShape, double_quant: bool) -> int:
    """Every parameter in 4-bit, as a reference point (qlora keeps embeddings, lm_head and vision in 16 bits)."""
    return four_bit_bytes(shape.total_params, double_quant)


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)
