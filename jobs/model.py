"""Load the base (in the run's precision, or 4-bit NF4/FP4 through bitsandbytes), attach LoRA, and keep
frozen what must stay frozen. The same functions serve training, merging and real checkpoints.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from orchestrator.architectures import Architecture
from orchestrator.config import JobConfig

if TYPE_CHECKING:
    import torch


def torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def base_dtype(job: JobConfig) -> torch.dtype:
    """Storage dtype of the base's (non-4-bit) weights.

    full: fp32 master weights, maths in the run's precision under autocast (the standard mixed-precision
    recipe). lora/qlora: the frozen base is stored in the run's precision; adapters stay fp32.
    """
    import torch

    return torch.float32 if job.method == "full" else torch_dtype(job.precision)


def model_class(arch: Architecture):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if arch.kind == "vlm" else AutoModelForCausalLM


def qwen2_vl_image_only_processor(arch_name: str = "qwen2_vl") -> type:
    """Qwen2-VL's (or Qwen2.5-VL's) processor without its video processor, which needs torchvision.

    A checkpoint saved by stock transformers names the stock class, whose video processor raises
    ImportError without torchvision, and AutoProcessor.register cannot override the class named in the
    file; this subclass's own from_pretrained loads the image processor and tokenizer and ignores the
    video entry."""
    from transformers import (
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLProcessor,
    )
    from transformers.processing_utils import ProcessorMixin

    base, config = (Qwen2_5_VLProcessor, Qwen2_5_VLConfig) if arch_name == "qwen2_5_vl" else (Qwen2VLProcessor, Qwen2VLConfig)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
            # as the stock class: the published checkpoints list their special tokens without naming an
            # image_token, and the stock processor falls back to <|image_pad|>
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{base.__name__}ImageOnly"
    AutoProcessor.register(config, ImageOnlyProcessor, exist_ok=True)
    return ImageOnlyProcessor


_WARNED: set[str] = set()
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def save_processor(processor: Any, base_dir: str, model_dir: Any) -> None:
    """Save the processor beside an exported model, keeping the base's own processor config files: where an
    image-only subclass loaded it (no torchvision), save_pretrained would name that subclass, which plain
    transformers does not know; the base's files name the stock class."""
    import shutil
    from pathlib import Path

    processor.save_pretrained(model_dir)
    for name in PROCESSOR_FILES:
        if (Path(base_dir) / name).is_file():
            shutil.copy2(Path(base_dir) / name, Path(model_dir) / name)


def load_processor(model_dir: str, arch: Architecture):
    import importlib.util

    from transformers import AutoProcessor, AutoTokenizer

    if arch.kind == "text":
        return AutoTokenizer.from_pretrained(model_dir)
    if arch.name in ("qwen2_vl", "qwen2_5_vl") and importlib.util.find_spec("torchvision") is None:
        if arch.name not in _WARNED:  # once per process: the controller's reaches the terminal, workers' ray.log
            _WARNED.add(arch.name)
            print(f"warning: torchvision is not installed: {arch.name} loads its image processor and tokenizer only (images train; videos cannot)", file=sys.stderr)
        return qwen2_vl_image_only_processor(arch.name).from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    if not hasattr(processor, "image_processor"):
        raise RuntimeError(
            f"{model_dir}: AutoProcessor returned only a tokenizer ({type(processor).__name__}); the image processor "
            "could not be built (a processor that needs torchvision, which is not installed?)"
        )
    return processor


def quantization_config(job: JobConfig, arch: Architecture):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=job.quantization.type,
        bnb_4bit_use_double_quant=job.quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(job.precision),
        # Vision tower, projector and lm_head stay in the run's precision (matched from the name's start).
        llm_int8_skip_modules=list(arch.keep_out_of_4bit),
    )


def attn_implementation(job: JobConfig, device: torch.device) -> str | None:
    """train.attn_implementation for from_pretrained: auto picks FlashAttention 2 on a GPU where flash_attn imports
    and the maths is half precision, else None (transformers' default: sdpa where the model supports it). An
    explicit flash_attention_2 without the package on this worker (a cluster's, unchecked before launch) fails here,
    naming the option, rather than in transformers' import."""
    from orchestrator.config.checks import flash_attn_importable

    choice = job.train.attn_implementation
    half = job.precision in ("bf16", "fp16")
    if choice == "auto":
        return "flash_attention_2" if device.type == "cuda" and half and flash_attn_importable() else None
    if choice == "flash_attention_2" and not flash_attn_importable():
        raise RuntimeError("train.attn_implementation: flash_attention_2, but the flash_attn package does not import on this worker "
                           "(fix: install flash-attn in the workers' image, or use attn_implementation: auto)")
    return choice


def load_kwargs(job: JobConfig, arch: Architecture, device: torch.device, zero3: bool) -> dict[str, Any]:
    """from_pretrained's dtype, quantization and placement. The weights are placed explicitly, CPU included:
    left to transformers, the bitsandbytes quantizer puts a 4-bit model on the current CUDA device whenever
    CUDA exists (the export's CPU parity check on a GPU host), and a model loaded without a device_map is
    built in host memory first (an fp32 8B is 32 GB, in each of a node's 8 workers at once) and then copied.
    Under ZeRO-3, DeepSpeed's zero.Init partitions the weights as they load: no device_map (transformers
    refuses one there). On the CPU a plain model loads as before, without one."""
    kwargs: dict[str, Any] = {"dtype": base_dtype(job)}
    attention = attn_implementation(job, device)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if job.quantized:
        kwargs["quantization_config"] = quantization_config(job, arch)
    if job.quantized or (device.type == "cuda" and not zero3):
        kwargs["device_map"] = {"": "cpu"} if device.type == "cpu" else {"": device.index or 0}
    return kwargs


def load_base(job: JobConfig, arch: Architecture, device: torch.device) -> Any:
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = model_class(arch).from_pretrained(job.model_dir, **load_kwargs(job, arch, device, is_deepspeed_zero3_enabled()))
    if job.quantized:
        disable_cpu_bf16_repack(model)
    else:
        model.to(device)  # a no-op where the device_map placed it
    return model


def disable_cpu_bf16_repack(model: Any) -> None:
    """bitsandbytes on CPUs with avx512_bf16 repacks Linear4bit weights in place on the first eval forward;
    afterwards training fails and dequantize() is wrong (bitsandbytes 0.50). Keep the packed layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_targets(job: JobConfig, arch: Architecture) -> str | list[str]:
    return arch.lora_target_regex(job.lora.train_vision) if job.lora.targets == "auto" else list(job.lora.targets)


def attach_lora(model: Any, job: JobConfig, arch: Architecture) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=job.lora.rank,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        target_modules=lora_targets(job, arch),
        bias="none",
        # lora.train_projector: a trainable copy of the projector beside the frozen one (peft's modules_to_save)
        modules_to_save=list(dict(arch.components).get("projector", ())) if job.lora.train_projector else None,
    )
    return get_peft_model(model, config)


def keep_adapter_inputs(model: Any) -> None:
    """Stop peft casting each adapted layer's input to the adapters' dtype (fp32).

    A bf16/fp16 run computes under autocast (or, under DeepSpeed, holds the adapters in the run's dtype), which
    hands every matmul its inputs in the run's dtype anyway: for a plain (not 4-bit) base, peft's cast is an
    fp32 copy of the activations at every adapted layer that autocast then copies back, and it runs the LoRA
    dropout in fp32. (peft's 4-bit layers already skip the cast under autocast.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def build_model(job: JobConfig, arch: Architecture, device: torch.device) -> Any:
    """The trainable model: the base, plus adapters for lora/qlora (everything else frozen)."""
    import torch

    torch.manual_seed(job.train.seed)  # same adapter init on every rank
    model = load_base(job, arch, device)
    if job.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.method in ("lora", "qlora"):
        model = attach_lora(model, job, arch)
        if not job.quantized:
            model.to(device)
        if job.precision != "fp32":
            keep_adapter_inputs(model)
    for name, param in model.named_parameters():
        if arch.component_of(name) in job.freeze or any(name == prefix or name.startswith(prefix + ".") for prefix in job.freeze):
            param.requires_grad_(False)
    return model


def param_groups(model: Any, job: JobConfig, arch: Architecture) -> list[tuple[str, list[Any], float]]:
    """The trainable parameters as (component, parameters, peak rate): one per component of train.lr_groups at its
    rate, the rest ("rest") at train.lr; one group when lr_groups is empty."""
    groups: dict[str, list[Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = arch.component_of(name)
            groups.setdefault(part if part in job.train.lr_groups else "rest", []).append(param)
    return [(part, params, job.train.lr_groups.get(part, job.train.lr)) for part, params in groups.items()]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hold a slice; ds_numel is the whole
        if hasattr(p, "quant_state"):  # bnb Params4bit: two 4-bit values per stored byte
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def parameter_bytes(model: Any) -> int:
    """Bytes the parameters occupy as stored: 4-bit weights packed, plus their quantization state (absmax,
    code tables, and the nested state of double quantization), each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        tensors = [p]
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total




def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: adapters for lora/qlora, every weight for full."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unknown[:5]}")
    import torch

    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
