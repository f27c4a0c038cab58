"""Checkpoint -> standalone model: adapter merged into the dequantized base, saved as safetensors shards with
the config and processor, then checked. The merge streams shard by shard (jobs/export_stream.py, the
default) or runs in memory (export.merge: in_memory, peft's merge_and_unload). The checks, recorded in the
manifest's `parity`: per merged layer, probe vectors (streamed); end to end, the reloaded model's logits
against the unmerged adapter model's, where the model fits export.parity_memory; for ZeRO exports, every
weight present with its shape, and a reload where it fits.

Why the dequantized base: the adapter was trained against dequant(W4), not the original W16; merging into
the original weights (or into 4-bit layers) changes logits by ~0.5 (measured on the tiny models).

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
from jobs.checkpoint import WEIGHTS_FILE
from jobs.evaluate import answer_stats
from jobs.model import (
    build_model,
    load_processor,
    load_trainable_state,
    model_class,
    save_processor,
    torch_dtype,
)
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
        if ".modules_to_save." in f"{mod_name}.":  # lora.train_projector's trained copy: the adapter's, not the base's
            continue
        clean = mod_name.replace(".base_layer", "").replace(".original_module", "")
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


def partial_dir(model_dir: Path) -> Path:
    """Where an export is written before it becomes model_dir: `<model_dir>.partial`, emptied first. Also
    removes `<model_dir>.partial.partial`, which earlier versions left (they wrote it twice over)."""
    tmp_dir = model_dir.with_name(model_dir.name + ".partial")
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


def _publish(tmp_dir: Path, model_dir: Path) -> None:
    """The checked export becomes model_dir: the previous model_dir is removed only now, after every check."""
    make_readable(tmp_dir)
    if model_dir.is_dir():
        shutil.rmtree(model_dir)
    tmp_dir.rename(model_dir)


def export(job: JobConfig, checkpoint_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """Write the standalone model to model_dir (through `<model_dir>.partial`, renamed into place once every check
    that ran passed); returns the parity record for the manifest: which checks ran, and their figures."""
    t0 = time.time()
    checkpoint_dir, model_dir = Path(checkpoint_dir), Path(model_dir)
    tmp_dir = partial_dir(model_dir)
    if not (checkpoint_dir / WEIGHTS_FILE).is_file():
        record = export_zero(job, checkpoint_dir, tmp_dir)
    elif job.export.merge == "in_memory":
        record = export_in_memory(job, checkpoint_dir, tmp_dir)
    else:
        record = export_streamed(job, checkpoint_dir, tmp_dir)
    record["export_s"] = round(time.time() - t0, 2)
    ran = [check for check in record["checks"].values() if check.get("ran")]
    record["merged_accuracy"] = next((c["merged_accuracy"] for c in ran if "merged_accuracy" in c), None)
    if job.eval.generate:  # the merged model's answers, from whichever check loaded it (it is loaded once)
        generations = [c.pop("generation") for c in record["checks"].values() if "generation" in c]
        reasons = "; ".join(describe(c) for c in record["checks"].values() if c["name"] in ("end_to_end", "reload") and not c.get("ran"))
        record["generation"] = generations[0] if generations else {"ran": False, "reason": reasons or "the merged model was not loaded"}
    failed = [name for name, check in record["checks"].items() if check.get("ran") and not check["passed"]]
    record["passed"] = not failed
    if failed:
        kept = model_dir.with_name(model_dir.name + ".failed")
        shutil.rmtree(kept, ignore_errors=True)
        tmp_dir.rename(kept)
        raise ParityError(f"{'; '.join(describe(record['checks'][name]) for name in failed)}; the unverified export is kept at {kept}")
    _publish(tmp_dir, model_dir)
    return record


def describe(check: dict[str, Any]) -> str:
    """One line for a check's outcome (rayft merge prints these)."""
    if not check.get("ran"):
        return f"{check['name']}: not run ({check['reason']})"
    if check["name"] == "layers":
        worst = f", worst {check['worst_layer']}" if check["worst_layer"] else ""
        return (f"layers: {check['layers']} merged layers, max relative probe difference {check['max_rel_diff']:.3g} "
                f"(tolerance {check['tolerance']:.3g}{worst})" + ("" if check["passed"] else f": FAILED at {check['failed'][0]['layer']}"))
    if check["name"] == "end_to_end":
        line = (f"end_to_end: max |logit diff| {check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:.3g}), "
                f"accuracy merged {check['merged_accuracy']:.1%} vs as trained {check['as_trained_accuracy']:.1%}")
        if check["passed"]:
            return line
        hint = ""
        if check.get("export_dtype") in ("bf16", "fp16"):
            hint = (f" (a {check['export_dtype']} export cannot hold an adapter update smaller than its rounding step, as after "
                    "a short or low-learning-rate run: export in fp32 with --set export.dtype=fp32, or train longer)")
        return f"{line}: FAILED{hint}"
    if check["name"] == "weights":
        return f"weights: {check['tensors']} tensors, every weight of the model present with its shape" + (
            "" if check["passed"] else f": FAILED, missing {check['missing'][:5]}, wrong shape {check['wrong_shape'][:5]}")
    if check["name"] == "reload":
        return f"reload: plain transformers loads it; answer accuracy {check['merged_accuracy']:.1%}" + ("" if check["passed"] else ": FAILED")
    return f"{check['name']}: {'passed' if check['passed'] else 'FAILED'}"


def end_to_end_bytes(fp32_bytes: int, logits: int = 0) -> int:
    """Host memory the end-to-end check needs: the as-trained model and the fp32 dequantized base it yields,
    a fresh fp32 model with the adapter, then the reloaded export (bench/export_scale.py: 2.55-2.73x the fp32
    size at 1.5B, 3.3-4.1x at 0.1-0.5B where the runtime's ~0.5 GiB counts), plus the logits it holds
    (logits_bytes)."""
    return int(2.8 * fp32_bytes) + 2**30 + logits


def logits_bytes(batches: list[dict[str, Any]], vocab: int) -> int:
    """The fp32 logits the end-to-end check holds at once: every parity batch's for the as-trained model and
    for the reference, and while the reloaded export is compared one batch's three more (its logits, their
    difference from the reference's, answer_stats' shifted copy). At a 151,646-token vocabulary this is
    the largest term for a small model (a 198M VLM's check peaked at 17.4 GB)."""
    per_batch = [int(b["input_ids"].numel()) * vocab * 4 for b in batches]
    return 2 * sum(per_batch) + 3 * max(per_batch, default=0)



def logits_bound(job: JobConfig, vocab: int) -> int:
    """logits_bytes before the parity rows are read: PARITY_BATCHES full micro batches of data.max_length."""
    one = job.train.micro_batch_size * job.data.max_length * vocab * 4
    return 2 * PARITY_BATCHES * one + 3 * one


def parity_allowance(job: JobConfig) -> tuple[int, str]:
    """(bytes the end-to-end check may use, where that figure came from)."""
    from orchestrator.planner import host_available

    limit = job.export.parity_bytes()
    if limit is not None:
        return limit, f"export.parity_memory: {job.export.parity_memory}"
    free = host_available() or 0
    return free, f"host MemAvailable {free / 2**30:.1f} GiB (export.parity_memory: auto)"


def _end_to_end_or_skip(job: JobConfig, checkpoint_dir: Path, model_dir: Path, fp32_bytes: int) -> dict[str, Any]:
    allowed, source = parity_allowance(job)
    need = end_to_end_bytes(fp32_bytes)
    if need <= allowed:  # the models fit: read the parity rows, whose logits count too
        arch = architectures.for_model_dir(job.model_dir)
        processor = load_processor(job.model_dir, arch)
        batches = _parity_batches(job, processor, arch)
        from orchestrator.planner import load_shape

        need = end_to_end_bytes(fp32_bytes, logits_bytes(batches, load_shape(job.model_dir).vocab))
    if need > allowed:
        return {"name": "end_to_end", "ran": False, "needs_bytes": need, "allowed_bytes": allowed,
                "reason": f"the logits check needs ~{need / 2**30:.1f} GiB of host memory; {source}"}
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint_dir / WEIGHTS_FILE))
    trained_logits, reference_logits, _ = _as_trained_and_reference(job, arch, weights, batches)
    return _compare(job, model_dir, batches, reference_logits, trained_logits)


def export_streamed(job: JobConfig, checkpoint_dir: Path, tmp_dir: Path) -> dict[str, Any]:
    """Shard by shard (jobs/export_stream.py), then the layer check's record, the side files, and the
    end-to-end check where the model fits export.parity_memory."""
    from jobs.export_stream import ExportError, merge_streamed

    write_side_files(job, tmp_dir)
    try:
        layers = merge_streamed(job, checkpoint_dir, tmp_dir)
    except ExportError as e:
        raise ParityError(str(e)) from e
    fp32_bytes = layers.pop("fp32_bytes")
    record: dict[str, Any] = {"merge": "streamed", "export_dtype": job.export.precision(job.precision), "fp32_bytes": fp32_bytes,
                              "shards": layers.pop("shards"), "merge_s": layers.pop("merge_s"), "checks": {}}
    if job.method == "full":
        record["checks"]["layers"] = {"name": "layers", "ran": False, "reason": "full fine-tuning: no adapter was merged"}
    else:
        record["checks"]["layers"] = {"name": "layers", **layers}
    record["checks"]["end_to_end"] = _end_to_end_or_skip(job, checkpoint_dir, tmp_dir, fp32_bytes)
    return record


def write_side_files(job: JobConfig, model_dir: Path) -> None:
    """config.json (dtype: the export's), generation config and processor beside the weights."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(job.model_dir)
    config.dtype = torch_dtype(job.export.precision(job.precision))
    config.save_pretrained(model_dir)
    try:
        GenerationConfig.from_pretrained(job.model_dir).save_pretrained(model_dir)
    except OSError:
        pass  # the base has no generation config
    save_processor(load_processor(job.model_dir, architectures.for_model_dir(job.model_dir)), job.model_dir, model_dir)


def _as_trained_and_reference(
    job: JobConfig, arch: architectures.Architecture, weights: dict[str, Any], batches: list[dict[str, Any]], keep: bool = False
) -> tuple[list[Any], list[Any], Any]:
    """Logits of the model as trained (4-bit base for qlora) and of the unmerged reference (the same adapter
    over the dequantized base, all fp32); the reference model itself when keep (the in-memory merge uses it).
    One model at a time is alive besides the fp32 base state the reference is built from."""
    from functools import partial

    import torch

    autocast = partial(torch.autocast, "cpu", dtype=torch_dtype(job.precision), enabled=job.precision != "fp32")
    trained = build_model(job, arch, torch.device("cpu"))
    load_trainable_state(trained, weights)
    trained.eval()
    trained_logits = [_logits(trained, b, autocast) for b in batches]
    if job.method == "full":
        reference = trained.float()
    else:
        base_state = dequantized_state(trained.get_base_model())
        del trained
        fresh = model_class(arch).from_pretrained(job.model_dir, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(base_state, strict=False)
        del base_state
        missing = [k for k in missing if k not in _tied_keys(fresh)]
        if missing or unexpected:
            raise ParityError(f"dequantized base does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        from jobs.model import attach_lora

        reference = attach_lora(fresh, job, arch)
        load_trainable_state(reference, weights)
        reference.eval()
    reference_logits = [_logits(reference, b) for b in batches]
    return trained_logits, reference_logits, reference if keep else None


def _compare(job: JobConfig, model_dir: Path, batches: list[dict[str, Any]], reference_logits: list[Any], trained_logits: list[Any]) -> dict[str, Any]:
    """Reload the written model with plain transformers (fp32) and compare its logits with the reference's."""
    import torch

    reloaded = model_class(architectures.for_model_dir(job.model_dir)).from_pretrained(model_dir, dtype=torch.float32).eval()
    diffs, scale, all_positions = [], 0.0, 0.0
    merged_stats, trained_stats = [0, 0], [0, 0]
    for batch, ref, tr in zip(batches, reference_logits, trained_logits, strict=True):
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
    tolerance = PARITY_RTOL[job.export.precision(job.precision)] * max(scale, 1.0)
    return {
        **_generation(job, reloaded),
        "name": "end_to_end",
        "ran": True,
        "compared": "reloaded merged model vs unmerged adapter over the dequantized base (fp32 maths), "
        "logits at the positions that predict answer tokens",
        "batches": len(batches),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": scale,
        "max_abs_logit_diff_all_positions": all_positions,
        "tolerance": tolerance,
        "passed": max_diff <= tolerance,
        "merged_accuracy": merged_stats[0] / max(merged_stats[1], 1),
        "as_trained_accuracy": trained_stats[0] / max(trained_stats[1], 1),
        "export_dtype": job.export.precision(job.precision),
    }


def export_in_memory(job: JobConfig, checkpoint_dir: Path, tmp_dir: Path) -> dict[str, Any]:
    """The whole model in memory: peft's merge_and_unload on the fp32 reference, save_pretrained, reload and
    compare. Holds the model several times over; the reference the streamed export is tested against."""
    from safetensors.torch import load_file

    t0 = time.time()
    arch = architectures.for_model_dir(job.model_dir)
    weights = load_file(str(checkpoint_dir / WEIGHTS_FILE))
    processor = load_processor(job.model_dir, arch)
    batches = _parity_batches(job, processor, arch)
    trained_logits, reference_logits, reference = _as_trained_and_reference(job, arch, weights, batches, keep=True)
    merged = reference if job.method == "full" else reference.merge_and_unload()
    from jobs.export_stream import fp32_size

    fp32_bytes = fp32_size(merged)
    merged.to(torch_dtype(job.export.precision(job.precision))).save_pretrained(tmp_dir, safe_serialization=True, max_shard_size="2GB")
    del merged, reference
    save_processor(processor, job.model_dir, tmp_dir)
    merge_s = round(time.time() - t0, 2)
    checks: dict[str, Any] = {}
    if job.method != "full":
        from jobs.export_stream import verify_layers

        checks["layers"] = {"name": "layers", **verify_layers(job, checkpoint_dir, tmp_dir)}
    checks["end_to_end"] = _compare(job, tmp_dir, batches, reference_logits, trained_logits)
    return {"merge": "in_memory", "export_dtype": job.export.precision(job.precision), "fp32_bytes": fp32_bytes, "merge_s": merge_s, "checks": checks}


def _generation(job: JobConfig, reloaded: Any, processor: Any = None) -> dict[str, Any]:
    """{"generation": the merged model's greedy answers on the first eval rows} when eval.generate is set (fp32,
    as plain transformers loads the export); export() moves it to the parity record's top level."""
    if not job.eval.generate:
        return {}
    from jobs.generate import generate, prompts

    arch = architectures.for_model_dir(job.model_dir)
    processor = processor or load_processor(job.model_dir, arch)
    source = job.data.eval or job.data.train
    result = generate(reloaded, processor, job, prompts(job, processor, arch, source))
    return {"generation": {"ran": True, "source": source, "max_new_tokens": job.eval.generate.max_new_tokens, **result}}


def _tied_keys(model: Any) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _parity_batches(job: JobConfig, processor: Any, arch: architectures.Architecture) -> list[dict[str, Any]]:
    """A few eval batches (train rows when there is no eval file): its first rows, read alone, whatever the
    file's size; a row longer than data.max_length is left out."""
    source = Path(job.data.eval or job.data.train)
    head = data_mod.read_head(source, PARITY_BATCHES * job.train.micro_batch_size).to_pylist()
    encoded = [data_mod.encode_row(row, i, job.data, processor, arch.kind == "vlm", source) for i, row in enumerate(head)]
    rows = [e for e in encoded if len(e.input_ids) <= job.data.max_length]
    pad_id = data_mod.pad_token_id(processor)
    mbs = job.train.micro_batch_size
    return [data_mod.collate(rows[i : i + mbs], pad_id) for i in range(0, len(rows), mbs)]


def export_zero(job: JobConfig, checkpoint_dir: Path, tmp_dir: Path) -> dict[str, Any]:
    """Full fine-tuning under ZeRO: DeepSpeed consolidates the ranks' shards into safetensors shards, tensor by
    tensor; config and processor are added. Checked: every weight of the model is present with its shape
    (from the shards' headers, no load); and, where the model fits export.parity_memory, plain transformers
    reloads it and answers the eval rows (there is no unmerged model to compare logits with)."""
    import torch

    from jobs.zero import consolidate

    if not (checkpoint_dir / "latest").is_file():
        raise ParityError(f"{checkpoint_dir}: neither {WEIGHTS_FILE} nor a DeepSpeed checkpoint (no `latest` file)")
    t0 = time.time()
    arch = architectures.for_model_dir(job.model_dir)
    assert job.deepspeed is not None
    consolidate(checkpoint_dir, tmp_dir, torch_dtype(job.export.precision(job.precision)), job.deepspeed.stage)
    write_side_files(job, tmp_dir)
    weights, fp32_bytes = _weights_check(job, arch, tmp_dir)
    record: dict[str, Any] = {"merge": "zero_consolidation", "export_dtype": job.export.precision(job.precision), "fp32_bytes": fp32_bytes,
                              "merge_s": round(time.time() - t0, 2), "checks": {"weights": weights}}
    need, (allowed, source) = int(1.2 * fp32_bytes) + 2**30, parity_allowance(job)
    if need > allowed:
        record["checks"]["reload"] = {"name": "reload", "ran": False,
                                      "reason": f"reloading needs ~{need / 2**30:.1f} GiB of host memory; {source}"}
        return record
    reloaded = model_class(arch).from_pretrained(tmp_dir, dtype=torch.float32).eval()
    processor = load_processor(job.model_dir, arch)
    correct = count = 0
    for batch in _parity_batches(job, processor, arch):
        _, _, c, n = answer_stats(_logits(reloaded, batch), batch["labels"])
        correct, count = correct + c, count + n
    record["checks"]["reload"] = {**_generation(job, reloaded, processor), "name": "reload", "ran": True, "passed": True, "merged_accuracy": correct / max(count, 1),
                                  "compared": "plain transformers reloads the export; answer accuracy on the eval rows"}
    return record


def _weights_check(job: JobConfig, arch: architectures.Architecture, model_dir: Path) -> tuple[dict[str, Any], int]:
    """Every weight of the model (built on the meta device) is in the written shards with its shape."""
    import json

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    with torch.device("meta"):
        meta = model_class(arch).from_config(AutoConfig.from_pretrained(job.model_dir))
    wanted = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    written: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(model_dir / name), "pt") as f:
            written.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    tied = _tied_keys(meta)
    missing = sorted(k for k in wanted if k not in written and k not in tied)
    wrong = sorted(k for k in wanted if k in written and written[k] != wanted[k])
    check = {"name": "weights", "ran": True, "tensors": len(written), "missing": missing, "wrong_shape": wrong,
             "passed": not missing and not wrong,
             "compared": "the written shards' headers vs the model's state dict (built on the meta device)"}
    return check, sum(4 * torch.Size(s).numel() for s in wanted.values())
