"""Shard-by-shard export: the base checkpoint is read one safetensors shard at a time, the adapter's
`B @ A * scale` is added to each targeted weight in fp32, and each input shard becomes one output shard in
the run's precision (with an index when there are several). Host memory stays at about one input shard
(memory-mapped) plus twice one output shard (the tensors and safetensors' serialized copy) plus the adapter, whatever the model's size.

Every weight goes through the same dtype steps the in-memory merge (jobs/merge.py: export_in_memory) takes,
so the two write the same bits:
- lora: cast to the run's precision (how the frozen base was stored while training), then fp32;
- qlora: every weight bitsandbytes stores in 4 bits (transformers' own rule: every nn.Linear outside
  `arch.keep_out_of_4bit` and the model's keep-in-fp32 modules) is cast to the run's precision, quantized and
  dequantized exactly as bitsandbytes did at load time, so the adapter is added to dequant(W4), the weights it
  was trained against, not to W;
- full (a weights.safetensors of every trained weight): the trained fp32 value, or the base's for frozen ones;
then the adapter's delta (fp32, peft's own order: (B @ A) * scale), then the cast to the export dtype.

The per-layer parity check sends probe vectors through each merged weight as written (in the export dtype)
and through the base as trained plus the adapter computed the other way round, x @ W^T + ((x @ A^T) @ B^T)
* scale; each written shard is then read back and compared with what was checked. A merge into the wrong
weights (W16 instead of dequant(W4): ~0.1 of the output's range) fails it, bf16 rounding (~0.003) does not.
The merge checks as it goes (the 4-bit round trip, the slow part on a CPU, runs once per weight);
verify_layers checks any export directory from the files alone (the in-memory export's, and tests').
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.checkpoint import WEIGHTS_FILE
from jobs.model import base_dtype, model_class, torch_dtype
from orchestrator import architectures
from orchestrator.config import JobConfig

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
PROBES = 8
# Max |probe output difference| between the written merged weight and dequantized base + adapter, relative
# to the largest |output|: the export dtype's rounding of each weight (bf16 keeps 8 significant bits:
# ~0.003 measured on the tiny models; fp16 11 bits; fp32 only summation order).
LAYER_RTOL = {"fp32": 1e-5, "bf16": 1.5e-2, "fp16": 2e-3}


class ExportError(RuntimeError):
    pass


@dataclass
class BaseLayout:
    """The base checkpoint as files of keys, and what each key is in the model."""

    files: list[tuple[str, list[str]]]  # shard file name -> its keys, in the index's order
    numel: dict[str, int]  # shard file name -> elements in it
    largest: int  # elements of the largest tensor
    to_model: dict[str, str]  # checkpoint key -> the model's state-dict key (transformers' renamings)
    rename: Callable[[str], str]  # the same, for any key (an export's, written with other names)
    quantized: set[str] = field(default_factory=set)  # model keys bitsandbytes stores in 4 bits (qlora)
    fp32_bytes: int = 0  # the model's size in fp32


def fp32_size(model: Any) -> int:
    """The model's bytes in fp32: every parameter and buffer once (a tied embedding and head share one tensor;
    the state dict names it twice)."""
    return 4 * (sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def read_layout(job: JobConfig, arch: architectures.Architecture) -> BaseLayout:
    """Shard files and key names from the safetensors headers only (nothing is read but the headers), and the
    model's key for each from a model built on the meta device (no memory) with transformers' own renaming
    rules (a checkpoint saved by an older transformers names keys differently, e.g. LLaVA's
    `language_model.model.*` that transformers 5 loads as `model.language_model.*`)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    root = Path(job.model_dir)
    if (root / INDEX_FILE).is_file():
        weight_map: dict[str, str] = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, []).append(key)
        files = sorted(by_file.items())
    elif (root / "model.safetensors").is_file():
        with safe_open(root / "model.safetensors", "pt") as f:
            files = [("model.safetensors", list(f.keys()))]
    else:
        raise ExportError(
            f"{root}: no model.safetensors or {INDEX_FILE}: the streamed export reads safetensors shards "
            "(convert the base with transformers' save_pretrained, or set export.merge: in_memory)"
        )
    config = AutoConfig.from_pretrained(root)
    if getattr(config, "quantization_config", None):
        raise ExportError(f"{root}: the base is stored pre-quantized ({config.quantization_config.get('quant_method')}); "
                          "export it from an unquantized base (the weights it was quantized from)")
    with torch.device("meta"):
        meta = model_class(arch).from_config(config)
    meta_state = meta.state_dict()
    conversions = get_model_conversion_mapping(meta)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]

    def rename(key: str) -> str:
        renamed, converted = rename_source_key(key, renamings, converters, meta.base_model_prefix, meta_state)
        if converted is not None:
            raise ExportError(f"{key}: transformers converts this weight while loading ({converted}); the streamed "
                              "export copies weights one to one (set export.merge: in_memory)")
        return renamed

    to_model = {key: rename(key) for _, keys in files for key in keys}
    numel, largest = {}, 0
    for name, keys in files:
        with safe_open(root / name, "pt") as f:
            sizes = [math.prod(f.get_slice(k).get_shape()) for k in keys]
        numel[name], largest = sum(sizes), max([largest, *sizes])
    layout = BaseLayout(files, numel, largest, to_model, rename, fp32_bytes=fp32_size(meta))
    if job.quantized:
        layout.quantized = four_bit_keys(meta, job, arch)
    return layout


RUNTIME_BYTES = 1 << 30  # the export process before it reads a weight: Python, torch, transformers, bitsandbytes


def memory_needed(job: JobConfig, checkpoint_dir: Path) -> int:
    """Host memory the streamed export needs, from the shards' headers: the largest input shard (its pages
    are mapped while it is read), the largest output shard twice (the tensors, and safetensors' serialized
    copy), four fp32 copies of the largest tensor (base as trained, delta, merged, the check's), the adapter,
    and the runtime. An upper bound: bench/export_scale.py measured 45-54% of it. The end-to-end check
    comes on top where it runs."""
    layout = read_layout(job, architectures.for_model_dir(job.model_dir))
    export_size = torch_dtype(job.export.precision(job.precision)).itemsize
    largest_in = max((Path(job.model_dir) / name).stat().st_size for name, _ in layout.files)
    largest_out = max(n * export_size for n in layout.numel.values())
    adapter = 0 if job.method == "full" else (checkpoint_dir / WEIGHTS_FILE).stat().st_size
    return largest_in + 2 * largest_out + 16 * layout.largest + adapter + RUNTIME_BYTES


def four_bit_keys(meta: Any, job: JobConfig, arch: architectures.Architecture) -> set[str]:
    """The weights transformers' bitsandbytes quantizer replaces with 4-bit ones, by its own rule."""
    from torch import nn
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from jobs.model import quantization_config

    qconfig = quantization_config(job, arch)
    quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
    skip = quantizer.get_modules_to_not_convert(meta, qconfig.llm_int8_skip_modules, meta._keep_in_fp32_modules)
    return {
        f"{name}.weight"
        for name, module in meta.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


SAVED = ".modules_to_save.default."  # peft's trainable copy of a module trained whole (lora.train_projector)


def saved_modules(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model weight key -> the trained weight, for the modules a LoRA run trained whole (peft's modules_to_save:
    `base_model.model.<module>.modules_to_save.default.<param>`)."""
    return {name.removeprefix("base_model.model.").replace(SAVED, "."): value for name, value in weights.items() if SAVED in name}


def read_adapters(job: JobConfig, weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """model weight key -> (A, B) in fp32, from the checkpoint's peft names
    (`base_model.model.<module>.lora_A.default.weight`); the weights of modules trained whole are saved_modules'."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in weights.items():
        if SAVED in name:
            continue
        module, sep, rest = name.partition(".lora_")
        if not sep or not module.startswith("base_model.model."):
            raise ExportError(f"checkpoint weight {name}: not a LoRA adapter weight (lora_A / lora_B of a Linear)")
        which = rest.split(".", 1)[0]  # A or B
        if which not in ("A", "B"):
            raise ExportError(f"checkpoint weight {name}: only Linear LoRA adapters merge (lora_A / lora_B)")
        pairs.setdefault(module.removeprefix("base_model.model.") + ".weight", {})[which] = value.float()
    broken = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if broken:
        raise ExportError(f"adapter of {broken[0]} lacks lora_A or lora_B")
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}


def roundtrip_4bit(w: torch.Tensor, job: JobConfig) -> torch.Tensor:
    """dequant(quant(W)) in fp32, as training saw it: bitsandbytes' quantize_4bit with the arguments
    transformers' loader gives Params4bit (blocksize 64, uint8 storage), from the run's dtype."""
    import bitsandbytes as bnb
    import torch

    packed, state = bnb.functional.quantize_4bit(
        w.to(torch_dtype(job.precision)).contiguous(),
        blocksize=64,
        compress_statistics=job.quantization.double_quant,
        quant_type=job.quantization.type,
        quant_storage=torch.uint8,
    )
    return bnb.functional.dequantize_4bit(packed, state).float()


def as_trained(w: torch.Tensor, model_key: str, job: JobConfig, layout: BaseLayout) -> torch.Tensor:
    """The base weight as training saw it, in fp32."""
    if model_key in layout.quantized:
        return roundtrip_4bit(w, job)
    return w.to(base_dtype(job)).float()


def delta(a: torch.Tensor, b: torch.Tensor, job: JobConfig) -> torch.Tensor:
    return (b @ a) * (job.lora.alpha / job.lora.rank)  # peft's get_delta_weight: (B @ A) * scaling


def output_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _trained_inputs(job: JobConfig, checkpoint_dir: Path, layout: BaseLayout) -> tuple[dict[str, tuple[Any, Any]], Any]:
    """(adapters by model key, the memory-mapped full checkpoint or None). lora/qlora: the adapter is small and
    loaded whole. full: every trained weight, read one tensor at a time."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = checkpoint_dir / WEIGHTS_FILE
    full = job.method == "full"
    weights = {} if full else load_file(str(path))
    adapters = read_adapters(job, weights)
    trained: Any = safe_open(str(path), "pt") if full else SavedModules(saved_modules(weights))
    known = set(layout.to_model.values())
    unknown = sorted((set(adapters) | set(trained.keys())) - known)
    if unknown:
        raise ExportError(f"the checkpoint has weights the base {job.model} lacks: {unknown[:5]}")
    return adapters, trained


class SavedModules:
    """A LoRA run's whole-trained weights (saved_modules), read as merge_streamed reads a full checkpoint."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def merge_streamed(job: JobConfig, checkpoint_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Write the merged model's shards (and index) into model_dir, one input shard at a time, checking each merged
    layer as it is made (probes, with the base as trained computed once) and each written shard read back.
    Returns the layer check's record with the export's shape (shards, fp32 size)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.time()
    layout = read_layout(job, architectures.for_model_dir(job.model_dir))
    export_dtype = torch_dtype(job.export.precision(job.precision))
    adapters, trained = _trained_inputs(job, checkpoint_dir, layout)
    trained_keys = set(trained.keys())  # a full run's every weight; a LoRA run's modules trained whole (lora.train_projector)
    model_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = merged = 0
    check = LayerCheck(job)
    n = len(layout.files)
    for i, (name, keys) in enumerate(layout.files):
        out_name = output_name(i, n)
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(Path(job.model_dir) / name), "pt") as f:
            for key in keys:
                model_key = layout.to_model[key]
                weight_map[key] = out_name
                if model_key in trained_keys:
                    value = trained.get_tensor(model_key).float()
                elif not f.get_slice(key).get_dtype().startswith(("F", "BF")):
                    tensors[key] = f.get_tensor(key)  # integer buffers are copied as they are
                    continue
                else:
                    value = as_trained(f.get_tensor(key), model_key, job, layout)
                if model_key in adapters:
                    a, b = adapters[model_key]
                    tensors[key] = (value + delta(a, b, job)).to(export_dtype)
                    check.layer(key, tensors[key].float(), value, a, b)  # the base as trained: computed once
                    merged += 1
                else:
                    tensors[key] = value.to(export_dtype)
        save_file(tensors, str(model_dir / out_name), metadata={"format": "pt"})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        with safe_open(str(model_dir / out_name), "pt") as written:  # the file holds exactly what was checked
            check.missing += [k for k in tensors if k not in written.keys() or not torch.equal(written.get_tensor(k), tensors[k])]
        del tensors
        print(f"export: shard {i + 1}/{n} written ({merged} of {len(adapters)} adapters merged; host memory {_rss_text()})", file=sys.stderr, flush=True)
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if merged != len(adapters):
        raise ExportError(f"{len(adapters) - merged} adapters found no base weight in {job.model}")
    record = {**check.record(), "written_back": "every written tensor read back and equal to the one checked"} if adapters else {}
    return {**record, "shards": n, "merge_s": round(time.time() - t0, 2), "fp32_bytes": layout.fp32_bytes}


def _rss_text() -> str:
    """This process's resident memory now and at its peak (Linux /proc; empty elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        now, peak = (int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))
        return f"{now:.2f} GiB, peak {peak:.2f} GiB"
    except (OSError, KeyError, ValueError):
        return "unknown"


def verify_layers(job: JobConfig, checkpoint_dir: Path, model_dir: Path, layout: BaseLayout | None = None) -> dict[str, Any]:
    """The per-layer parity check of any export in model_dir (the in-memory one's too, whose keys may be named
    otherwise): for every adapted layer, probes through the written weight vs through the base as trained
    (recomputed from the base's shard) plus the adapter. Reads one base shard and one written tensor at a
    time, whatever the model's size."""
    from safetensors import safe_open

    t0 = time.time()
    layout = layout or read_layout(job, architectures.for_model_dir(job.model_dir))
    adapters, _ = _trained_inputs(job, checkpoint_dir, layout)
    index = model_dir / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    where: dict[str, tuple[str, str]] = {}  # model key -> (file, key as written): an export may name keys otherwise
    for out_file in files:
        with safe_open(str(model_dir / out_file), "pt") as written:
            where.update({layout.rename(k): (out_file, k) for k in written.keys()})
    check = LayerCheck(job)
    for name, keys in layout.files:
        wanted = [k for k in keys if layout.to_model[k] in adapters]
        if not wanted:
            continue
        with safe_open(str(Path(job.model_dir) / name), "pt") as f:
            for key in wanted:
                if layout.to_model[key] not in where:
                    check.missing.append(key)
                    continue
                out_file, out_key = where[layout.to_model[key]]
                with safe_open(str(model_dir / out_file), "pt") as written:
                    got = written.get_tensor(out_key).float()
                model_key = layout.to_model[key]
                check.layer(key, got, as_trained(f.get_tensor(key), model_key, job, layout), *adapters[model_key])
    return {**check.record(), "check_s": round(time.time() - t0, 2)}


class LayerCheck:
    """Probe vectors through each written merged weight against dequantized base + adapter."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.tolerance = LAYER_RTOL[job.export.precision(job.precision)]
        self.names: list[str] = []
        self.missing: list[str] = []
        self.worst = (0.0, "")
        self.failed: list[tuple[str, float]] = []

    def layer(self, key: str, written: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        import torch

        generator = torch.Generator().manual_seed(len(self.names))
        x = torch.randn(PROBES, written.shape[1], generator=generator)
        got = x @ written.T
        want = x @ base.T + ((x @ a.T) @ b.T) * (self.job.lora.alpha / self.job.lora.rank)
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        self.names.append(key)
        if rel > self.worst[0]:
            self.worst = (rel, key)
        if rel > self.tolerance:
            self.failed.append((key, rel))

    def record(self) -> dict[str, Any]:
        return {
            "ran": True,
            "compared": f"{PROBES} random probe vectors through each written merged weight vs the base as trained "
            "(dequantized for 4-bit layers) plus the adapter, x @ W^T + ((x @ A^T) @ B^T) * scale; "
            "max |difference| relative to max |output|",
            "layers": len(self.names),
            "max_rel_diff": self.worst[0],
            "worst_layer": self.worst[1],
            "tolerance": self.tolerance,
            "failed": [{"layer": k, "rel_diff": r} for k, r in self.failed[:10]] + [{"layer": k, "rel_diff": None, "missing": True} for k in self.missing[:10]],
            "passed": not self.failed and not self.missing,
        }
