"""The capability matrix in orchestrator/architectures.py against real transformers module layouts.

Each architecture is built tiny from its config class (random weights, no hub) and its LoRA regexes,
4-bit skip prefixes and vision prefixes are checked against `model.named_modules()` the way peft and
bitsandbytes read them. A wrong name there fails silently in training (a layer without an adapter, a
quantized vision tower), so it has to fail here instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    PaliGemmaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    SiglipVisionConfig,
)

from orchestrator.architectures import Architecture, for_model_type

HIDDEN = 32
LAYERS = 2
VOCAB = 128
IMAGE_TOKEN = VOCAB - 1  # the VLM configs' defaults (128257, 151655, ...) would not fit the tiny vocabulary
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _text(**extra: Any) -> dict[str, Any]:
    """Tiny decoder settings; grouped-query attention as in the real checkpoints (k/v narrower than q)."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN * 2,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,  # the defaults (e.g. Qwen's 151643) lie outside the tiny vocabulary
        "eos_token_id": 2,
        "pad_token_id": 0,
        **extra,
    }


def _vit() -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN * 2,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }


def llava() -> PretrainedConfig:
    # SigLIP's default vision_use_head=True is kept: its pooling head exists in the module tree (and in
    # checkpoints that keep it) although LLaVA never reads it, so the vision regex must leave it alone.
    return LlavaConfig(
        vision_config=SiglipVisionConfig(**_vit()),
        text_config=Qwen2Config(**_text()),
        image_token_index=IMAGE_TOKEN,
    )


def idefics3() -> PretrainedConfig:
    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**_vit()),
        text_config=LlamaConfig(**_text()),
        image_token_id=IMAGE_TOKEN,
    )


def _qwen_vl_tokens() -> dict[str, int]:
    return {
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VOCAB - 2,
        "vision_start_token_id": VOCAB - 3,
        "vision_end_token_id": VOCAB - 4,
    }


# Qwen-VL text: head_dim 8 gives 4 rotary frequencies, split over (time, height, width).
QWEN_VL_TEXT = _text(rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]})


def qwen2_vl() -> PretrainedConfig:
    # embed_dim is the tower's width; hidden_size is the merger's output, i.e. the text model's width.
    vision = {"depth": LAYERS, "embed_dim": HIDDEN, "hidden_size": HIDDEN, "num_heads": 4, "mlp_ratio": 2}
    return Qwen2VLConfig(vision_config=vision, text_config=QWEN_VL_TEXT, **_qwen_vl_tokens())


def qwen2_5_vl() -> PretrainedConfig:
    vision = {
        "depth": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN * 2,
        "out_hidden_size": HIDDEN,
        "num_heads": 4,
        "fullatt_block_indexes": [LAYERS - 1],
    }
    return Qwen2_5_VLConfig(vision_config=vision, text_config=QWEN_VL_TEXT, **_qwen_vl_tokens())


def paligemma() -> PretrainedConfig:
    return PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_vit()),
        text_config=GemmaConfig(**_text(head_dim=8)),
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        projection_dim=HIDDEN,
        image_token_index=IMAGE_TOKEN,
    )


def llama() -> PretrainedConfig:
    return LlamaConfig(**_text())


def qwen2() -> PretrainedConfig:
    return Qwen2Config(**_text())


# name in the matrix -> (tiny config builder, expected kind)
CASES: dict[str, tuple[Callable[[], PretrainedConfig], str]] = {
    "llava": (llava, "vlm"),
    "idefics3": (idefics3, "vlm"),
    "qwen2_vl": (qwen2_vl, "vlm"),
    "qwen2_5_vl": (qwen2_5_vl, "vlm"),
    "paligemma": (paligemma, "vlm"),
    "llama": (llama, "text"),
    "qwen2": (qwen2, "text"),
}
VLMS = [name for name, (_, kind) in CASES.items() if kind == "vlm"]


def build(name: str) -> tuple[Architecture, PreTrainedModel]:
    """A fresh tiny model (each test gets its own: peft and the 4-bit swap modify it in place)."""
    make_config, kind = CASES[name]
    config = make_config()
    arch = for_model_type(config.model_type)
    auto = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
    return arch, auto.from_config(config)


def matches(model: nn.Module, regex: str) -> dict[str, nn.Module]:
    """What a string target_modules selects: peft re.fullmatch-es it against every module name."""
    return {name: module for name, module in model.named_modules() if re.fullmatch(regex, name)}


def under(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def decoder_layers(model: PreTrainedModel) -> list[str]:
    """The language model's decoder layer names, found from the model (get_decoder), not from the matrix."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    return [f"{prefix}.layers.{i}" for i in range(len(decoder.layers))]


def vision_block_linears(model: nn.Module, tower: str) -> set[str]:
    """Linears in the tower's repeated blocks (`encoder.layers.N`, `blocks.N`): what train_vision adapts.

    Not the patch embedding, Qwen's merger or SigLIP's pooling head (LLaVA and PaliGemma never read it).
    """
    block = re.compile(rf"{re.escape(tower)}\.(?:encoder\.layers|blocks)\.\d+\.")
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and block.match(n)}


@pytest.mark.parametrize("name", list(CASES))
def test_matrix_entry_and_kind(name: str) -> None:
    make_config, kind = CASES[name]
    arch = for_model_type(make_config().model_type)
    assert arch.name == name
    assert arch.kind == kind, f"{name} is a {kind} model, the matrix says {arch.kind}"
    assert set(arch.methods) == {"full", "lora", "qlora"}


@pytest.mark.parametrize("name", list(CASES))
def test_default_lora_covers_every_decoder_projection_and_nothing_else(name: str) -> None:
    arch, model = build(name)
    hits = matches(model, arch.lora_target_regex(train_vision=False))
    assert hits, f"{name}: the default LoRA regex matches no module"
    layers = decoder_layers(model)
    for module_name, module in hits.items():
        assert isinstance(module, nn.Linear), f"{module_name} is a {type(module).__name__}, not nn.Linear"
        assert under(module_name, layers), f"{module_name} is outside the language model's decoder layers"
        assert not under(module_name, (*arch.vision_modules, "lm_head"))
    for layer in layers:
        covered = {n.rsplit(".", 1)[1] for n in hits if n.startswith(layer + ".")}
        assert covered == PROJECTIONS, f"{layer}: LoRA misses {sorted(PROJECTIONS - covered)}"
    assert len(hits) == len(layers) * len(PROJECTIONS)  # exactly one match per projection, no extras


@pytest.mark.parametrize("name", VLMS)
def test_train_vision_adds_exactly_the_vision_tower_block_linears(name: str) -> None:
    arch, model = build(name)
    default = matches(model, arch.lora_target_regex(train_vision=False))
    both = matches(model, arch.lora_target_regex(train_vision=True))
    extra = {n: m for n, m in both.items() if n not in default}
    assert default.keys() <= both.keys()
    assert extra, f"{name}: train_vision adds no module"
    # The tower comes first in vision_modules; a separate projector, where there is one, after it.
    tower = arch.vision_modules[0]
    for module_name, module in extra.items():
        assert isinstance(module, nn.Linear), f"{module_name} is a {type(module).__name__}, not nn.Linear"
        assert under(module_name, (tower,)), f"{module_name} is outside the vision tower `{tower}`"
    # Equal, not just a subset: a misspelt projection would leave blocks without adapters, and a too-broad
    # regex would put adapters where no gradient reaches (SigLIP's pooling head).
    wanted = vision_block_linears(model, tower)
    assert set(extra) == wanted, (
        f"missing {sorted(wanted - set(extra))}, unwanted {sorted(set(extra) - wanted)}"
    )


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_train_vision_changes_nothing_for_text_models(name: str) -> None:
    arch = for_model_type(name)
    assert arch.vision_modules == () and arch.vision_lora_targets == ""
    assert arch.lora_target_regex(train_vision=True) == arch.lora_target_regex(train_vision=False)


@pytest.mark.parametrize("name", list(CASES))
def test_prefixes_name_real_modules_and_keep_the_vision_side_out_of_4bit(name: str) -> None:
    arch, model = build(name)
    names = {n for n, _ in model.named_modules()}
    for prefix in (*arch.keep_out_of_4bit, *arch.vision_modules):
        assert prefix in names, f"{name}: `{prefix}` is not a module name"

    # Swap Linears for bnb 4-bit ones exactly as transformers' 4-bit loader does with llm_int8_skip_modules
    # (it matches from the start of the full name), then see what was quantized.
    import bitsandbytes as bnb
    from transformers.integrations import replace_with_bnb_linear

    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}  # what the loader would convert
    skip = list(arch.keep_out_of_4bit)
    replace_with_bnb_linear(
        model,
        modules_to_not_convert=skip,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip),
    )
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    kept = linears - quantized
    assert all(under(n, arch.keep_out_of_4bit) for n in kept), f"{name}: unexpectedly kept {sorted(kept)}"
    assert not any(under(n, (*arch.vision_modules, "lm_head")) for n in quantized)
    assert "lm_head" in kept
    lm_projections = {n for n in linears if under(n, decoder_layers(model))}
    assert lm_projections and lm_projections <= quantized


@pytest.mark.parametrize(
    ("name", "train_vision"),
    [(name, False) for name in CASES] + [(name, True) for name in VLMS],
)
def test_get_peft_model_trains_only_lora_parameters(name: str, train_vision: bool) -> None:
    from peft import LoraConfig, get_peft_model

    arch, model = build(name)
    regex = arch.lora_target_regex(train_vision)
    expected = set(matches(model, regex))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    # peft's own record of what it wrapped is what our re.fullmatch predicts.
    assert set(peft_model.targeted_module_names) == expected
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    not_lora = sorted(n for n in trainable if ".lora_" not in n)
    assert trainable and not not_lora, f"{name}: trainable outside LoRA: {not_lora}"
    assert len(trainable) == 2 * len(expected)  # one lora_A and one lora_B per adapted Linear


def test_nvila_lite_is_full_fine_tuning_only() -> None:
    arch = for_model_type("nvila_lite")
    assert arch.methods == ("full",)
    assert arch.lora_targets == "" and arch.keep_out_of_4bit == ()


@pytest.mark.parametrize("name", list(CASES))
def test_components_cover_every_weight_once_and_name_the_projector(name: str) -> None:
    """freeze and train.lr_groups take component names (vision, projector, language): each architecture's
    prefixes put every weight in exactly one component, found from the model (get_decoder for the language model),
    and the projector (Qwen2-VL's merger inside its vision tower) apart from the vision tower."""
    arch, model = build(name)
    parts = {n: arch.component_of(n) for n, _ in model.named_parameters()}
    assert None not in parts.values(), f"{name}: in no component: {[n for n, p in parts.items() if p is None][:5]}"
    decoder = decoder_layers(model)[0].rsplit(".layers.", 1)[0]
    assert {p for n, p in parts.items() if under(n, [decoder])} == {"language"}
    assert arch.component_of("base_model.model." + next(iter(parts))) == next(iter(parts.values()))  # peft's prefix
    if arch.kind == "vlm":
        assert set(parts.values()) == {"vision", "projector", "language"}
        assert all(under(n, arch.vision_modules) for n, p in parts.items() if p in ("vision", "projector"))
    else:
        assert set(parts.values()) == {"language"}
