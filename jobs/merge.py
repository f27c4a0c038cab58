"""Checkpoint -> standalone model: adapter merged into the dequantized base, saved as safetensors with its
processor, then reloaded with plain transformers and checked against the adapter model's logits.

Why the dequantized base: the adapter was trained against dequant(W4), not the original W16; merging into
the original weights (or into 4-bit layers) changes logits by ~0.5 (PLATFORM.md).

This module alone owns the write-beside-then-rename step: the model is written to `<out>.partial`
(model.partial beside model/) and renamed into place only once it is checked and readable, so `model/`
is always complete, a failed or killed export leaves the previous `model/` as it was plus at most
`model.partial`, and the next export removes that.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from jobs import data as data_mod
from jobs.evaluate import answer_stats
from jobs.model import (
    build_model,
    load_processor,
    load_trainable_state,
    model_class,
    save_processor,
    torch_dtype,
)
from jobs.train_loop import WEIGHTS_FILE
from orchestrator import architectures
from orchestrator.config import JobConfig

PARITY_BATCHES = 4
# Max |logit difference| allowed between the reloaded merged model and the unmerged adapter model
# (both computed in fp32) at the positions that predict answer tokens, relative to the largest |logit|
# there. fp32 exports differ by float rounding only (~1e-6); bf16/fp16 exports round each merged weight
# to 8/11 mantissa bits.
PARITY_RTOL = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


class ParityError(RuntimeError):
    pass


def dequantized_state(model: Any) -> dict[str, Any]:
    """The base's weights as training saw them, in fp32: 4-bit layers dequantized, adapters left out."""
    import bitsandbytes as bnb
    import torch

    state: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if ".lora_" in f".{mod_name}" or "lora_" in mod_name.rsplit(".", 1)[-1]:
            continue
        clean = mod_name.replace(".base_layer", "")
        prefix = f"{clean}." if clean else ""
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            state[prefix + "weight"] = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach().float()
            continue
        persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
        for p_name, p in {**module._parameters, **persistent}.items():
            if p is not None and "lora_" not in p_name:
                state[prefix + p_name] = p.detach().float()
    return state


def parity_diff(got: Any, ref: Any, labels: Any) -> tuple[float, float]:
    """(max |got - ref|, max |ref|) over the logits that predict answer tokens: what training scored and
    what decoding reads. The other positions (image and prompt tokens) are left out: no decision is made
    from them, and after long training they can be so far off-distribution that a bf16 export's rounding
    moves them by a third of their range while every answer logit stays within 1% (a 16k-step QLoRA run:
    1.97 at a prompt position, 0.05 at answer positions, the same 64/64 answers)."""
    mask = labels[:, 1:] != data_mod.IGNORE_INDEX
    got, ref = got[:, :-1][mask], ref[:, :-1][mask]
    if ref.numel() == 0:
        return 0.0, 0.0
    return float((got - ref).abs().max()), float(ref.abs().max())


def _logits(model: Any, batch: dict[str, Any], autocast: Any = None) -> Any:
    from contextlib import nullcontext

    import torch

    with torch.no_grad(), (autocast() if autocast else nullcontext()):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()


def partial_dir(out_dir: Path) -> Path:
    """Where an export is written before it becomes out_dir: `<out_dir>.partial`, emptied first. Also
    removes `<out_dir>.partial.partial`, which earlier versions left (they wrote it twice over)."""
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    for stale in (tmp_dir, tmp_dir.with_name(tmp_dir.name + ".partial")):
        if stale.is_dir():
            shutil.rmtree(stale)
    return tmp_dir


def _umask() -> int:
    """The process umask, read from /proc where Linux reports it: os.umask can only read it by setting it,
    which races with files other threads create meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Give every file under root mode 0o666 & ~umask and every directory 0o777 & ~umask, as a plain open()
    or mkdir leaves them (config.json, tokenizer files), so another user's serving process can read the model.
    Needed because safetensors >= 0.8 writes each file to a temporary file, mode 0600 whatever the umask,
    and renames it into place (safetensors/safetensors#782): model*.safetensors from save_pretrained, and the
    ZeRO path's shards, came out 0600."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """The checked export becomes out_dir: the previous out_dir is removed only now, after every check."""
    make_readable(tmp_dir)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)


def export(job: JobConfig, checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the standalone model to out_dir (through `<out_dir>.partial`, renamed into place once it passes
    the parity check); returns the parity record for the manifest."""
    from functools import partial

    import torch
    from safetensors.torch import load_file

    t0 = time.time()
    out_dir = Path(out_dir)
    tmp_dir = partial_dir(out_dir)
    if not Path(checkpoint_dir, WEIGHTS_FILE).is_file():
        return export_zero(job, Path(checkpoint_dir), out_dir, tmp_dir)
    arch = architectures.for_model_dir(job.model)
    cpu = torch.device("cpu")
    weights = load_file(os.path.join(checkpoint_dir, WEIGHTS_FILE))
    export_dtype = torch_dtype(job.precision)

    processor = load_processor(job.model, arch)
    parity_batches = _parity_batches(job, processor, arch)
    autocast = partial(torch.autocast, "cpu", dtype=torch_dtype(job.precision), enabled=job.precision != "fp32")

    # 1. The model as trained (4-bit base for qlora) with the checkpoint's weights.
    trained = build_model(job, arch, cpu)
    load_trainable_state(trained, weights)
    trained.eval()
    trained_logits = [_logits(trained, b, autocast) for b in parity_batches]

    # 2. The unmerged reference: the same adapter over the dequantized base, all fp32.
    cls = model_class(arch)
    if job.method == "full":
        reference = trained.float()
        merged = reference
    else:
        base_state = dequantized_state(trained.get_base_model())
        del trained
        fresh = cls.from_pretrained(job.model, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(base_state, strict=False)
        missing = [k for k in missing if k not in _tied_keys(fresh)]
        if missing or unexpected:
            raise ParityError(f"dequantized base does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        from jobs.model import attach_lora

        reference = attach_lora(fresh, job, arch)
        load_trainable_state(reference, weights)
        reference.eval()
    reference_logits = [_logits(reference, b) for b in parity_batches]

    # 3. Merge, save in the run's precision, reload with plain transformers, compare.
    if job.method != "full":
        merged = reference.merge_and_unload()
    merged.to(export_dtype).save_pretrained(tmp_dir, safe_serialization=True, max_shard_size="2GB")
    save_processor(processor, job.model, tmp_dir)
    reloaded = cls.from_pretrained(tmp_dir, dtype=torch.float32).eval()
    diffs, scale, all_positions = [], 0.0, 0.0
    merged_stats, trained_stats = [0, 0], [0, 0]
    for batch, ref, tr in zip(parity_batches, reference_logits, trained_logits, strict=True):
        got = _logits(reloaded, batch)
        diff, batch_scale = parity_diff(got, ref, batch["labels"])
        diffs.append(diff)
        scale = max(scale, batch_scale)
        all_positions = max(all_positions, float((got - ref).abs().max()))
        for stats, logits in ((merged_stats, got), (trained_stats, tr)):
            _, _, correct, count = answer_stats(logits, batch["labels"])
            stats[0] += correct
            stats[1] += count
    max_diff = max(diffs) if diffs else 0.0
    tolerance = PARITY_RTOL[job.precision] * max(scale, 1.0)
    record = {
        "compared": "reloaded merged model vs unmerged adapter over the dequantized base (fp32 maths), "
        "logits at the positions that predict answer tokens",
        "batches": len(parity_batches),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": scale,
        "max_abs_logit_diff_all_positions": all_positions,
        "tolerance": tolerance,
        "passed": max_diff <= tolerance,
        "merged_accuracy": merged_stats[0] / max(merged_stats[1], 1),
        "as_trained_accuracy": trained_stats[0] / max(trained_stats[1], 1),
        "export_dtype": job.precision,
        "export_s": round(time.time() - t0, 2),
    }
    if not record["passed"]:
        failed = out_dir.with_name(out_dir.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        tmp_dir.rename(failed)
        raise ParityError(
            f"merged model differs from the adapter model by {max_diff:.3g} in logits (tolerance {tolerance:.3g}); "
            f"the unverified export is kept at {failed}"
        )
    _publish(tmp_dir, out_dir)
    return record


def _tied_keys(model: Any) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _parity_batches(job: JobConfig, processor: Any, arch: architectures.Architecture) -> list[dict[str, Any]]:
    """A few eval batches (train rows when there is no eval file)."""
    source = job.data.eval or job.data.train
    n = min(data_mod.read_table(source).num_rows, PARITY_BATCHES * job.train.micro_batch_size)
    rows, _ = data_mod.encode_rows(source, job.data, processor, arch.kind == "vlm", list(range(n)))
    pad_id = getattr(processor, "tokenizer", processor).pad_token_id or 0
    mbs = job.train.micro_batch_size
    return [data_mod.collate(rows[i : i + mbs], pad_id) for i in range(0, len(rows), mbs)]


def export_zero(job: JobConfig, checkpoint_dir: Path, out_dir: Path, tmp_dir: Path) -> dict[str, Any]:
    """Full fine-tuning under ZeRO: consolidate the ranks' shards into safetensors shards, add config and
    processor, and check that plain transformers loads every weight."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from jobs.zero import consolidate

    t0 = time.time()
    if not (checkpoint_dir / "latest").is_file():
        raise ParityError(f"{checkpoint_dir}: neither {WEIGHTS_FILE} nor a DeepSpeed checkpoint (no `latest` file)")
    arch = architectures.for_model_dir(job.model)
    export_dtype = torch_dtype(job.precision)
    assert job.deepspeed is not None
    consolidate(checkpoint_dir, tmp_dir, export_dtype, job.deepspeed.stage)
    config = AutoConfig.from_pretrained(job.model)
    config.dtype = export_dtype
    config.save_pretrained(tmp_dir)
    try:
        GenerationConfig.from_pretrained(job.model).save_pretrained(tmp_dir)
    except OSError:
        pass  # the base has no generation config
    processor = load_processor(job.model, arch)
    save_processor(processor, job.model, tmp_dir)
    reloaded, info = model_class(arch).from_pretrained(tmp_dir, dtype=torch.float32, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k not in _tied_keys(reloaded)]
    if missing:
        raise ParityError(f"consolidated checkpoint misses weights: {missing[:5]} (kept at {tmp_dir})")
    correct = count = 0
    for batch in _parity_batches(job, processor, arch):
        _, _, c, n = answer_stats(_logits(reloaded.eval(), batch), batch["labels"])
        correct, count = correct + c, count + n
    _publish(tmp_dir, out_dir)
    return {
        "compared": "full fine-tuning under ZeRO: shards consolidated; every weight reloaded by plain transformers",
        "batches": PARITY_BATCHES,
        "max_abs_logit_diff": 0.0,
        "tolerance": 0.0,
        "passed": True,
        "merged_accuracy": correct / max(count, 1),
        "export_dtype": job.precision,
        "export_s": round(time.time() - t0, 2),
    }
