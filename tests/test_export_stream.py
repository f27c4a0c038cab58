"""The streamed export (jobs/export_stream.py) as `rayft merge` runs it, against the in-memory export
(peft's merge_and_unload on the whole model): the same weights on every architecture of the matrix, a
per-layer check that catches a merge into the wrong weights, and host memory that does not grow with the
model. Checkpoints are real: the adapters (or every weight, for full) of the model as build_model makes
it, moved off their initial values so that merging changes every adapted weight.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from jobs.checkpoint import WEIGHTS_FILE
from jobs.export_stream import INDEX_FILE, read_layout, verify_layers
from jobs.merge import ParityError, export
from jobs.model import build_model, trainable_state
from orchestrator import architectures, tinymodels
from orchestrator.config import build_job

ARCHS = ["llava", "idefics3", "qwen2_vl", "paligemma", "llama", "qwen2"]
# (method, precision, quantization): lora over a bf16 base, QLoRA NF4 exported in bf16, QLoRA FP4 in fp32
CASES = [("lora", "bf16", "none"), ("qlora", "bf16", "nf4"), ("qlora", "fp32", "fp4")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """One tiny base per architecture; the text ones saved in several shards, as hub checkpoints are."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name in ARCHS:
        if name in tinymodels.TINY_VLMS:
            out[name] = tinymodels.TINY_VLMS[name](root / name)
        else:
            out[name] = tinymodels.build_tiny_text(root / name, name, hidden=64, layers=2, max_shard_size="40KB")
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rows")
    vlm = tinymodels.write_colour_data(root / "vlm", "english", 16, 8)
    text = [{"question": r["question"], "answer": r["answer"], "image": None} for r in tinymodels.colour_rows(8)]
    return {"vlm": vlm["eval"], "text": tinymodels.write_parquet(text, root / "text.parquet")}


def job_for(base: Path, rows: dict[str, Path], method: str, precision: str, quant: str, **export):
    kind = architectures.for_model_dir(base).kind
    data = str(rows["vlm" if kind == "vlm" else "text"])
    raw = {
        "model": str(base), "method": method, "precision": precision,
        "data": {"train": data, "eval": data, "max_length": 64},
        "train": {"micro_batch_size": 4}, "export": export,
    }
    if method == "qlora":
        raw["quantization"] = {"type": quant, "double_quant": True}
    return build_job(raw)[0]


def checkpoint(job, root: Path, seed: int = 1) -> Path:
    """What training saves (jobs/train_loop.py): the trainable weights as build_model makes them, moved by a
    random step (LoRA B starts at zero; unmoved, a merge would change nothing)."""
    model = build_model(job, architectures.for_model_dir(job.model), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in trainable_state(model).items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / WEIGHTS_FILE))
    return root


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights as plain transformers loads them (no peft, no bitsandbytes)."""
    from jobs.model import model_class

    arch = architectures.for_model_dir(model_dir)
    return model_class(arch).from_pretrained(model_dir).state_dict()


@pytest.mark.parametrize("method,precision,quant", CASES, ids=["lora-bf16", "qlora-nf4-bf16", "qlora-fp4-fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_export_equals_the_in_memory_export(bases, rows, tmp_path, arch, method, precision, quant):
    job = job_for(bases[arch], rows, method, precision, quant)
    ckpt = checkpoint(job, tmp_path / "ckpt")
    streamed = export(job, ckpt, tmp_path / "streamed")
    in_memory = export(job.model_copy(update={"export": job.export.model_copy(update={"merge": "in_memory"})}), ckpt, tmp_path / "in_memory")
    assert streamed["merge"] == "streamed" and in_memory["merge"] == "in_memory"
    assert in_memory["checks"]["layers"]["passed"]  # the same layer check, reading the in-memory export's files
    got, want = tensors(tmp_path / "streamed"), tensors(tmp_path / "in_memory")
    assert got.keys() == want.keys()
    # Bit for bit: both take the same dtype steps (run dtype, 4-bit round trip, fp32, peft's (B @ A) * scale,
    # export dtype) with the same kernels on the same device.
    unequal = {k: float((got[k].float() - want[k].float()).abs().max()) for k in got if not torch.equal(got[k], want[k])}
    assert not unequal
    assert {str(t.dtype) for t in got.values() if t.is_floating_point()} == {f"torch.{'bfloat16' if precision == 'bf16' else 'float32'}"}
    layers, e2e = streamed["checks"]["layers"], streamed["checks"]["end_to_end"]
    assert layers["passed"] and layers["layers"] == sum(".lora_A." in k for k in safe_open(str(ckpt / WEIGHTS_FILE), "pt").keys())
    assert e2e["ran"] and e2e["passed"], e2e
    # the output keeps the base's shard layout (and its key names, old-style or not)
    layout = read_layout(job, architectures.for_model_dir(job.model))
    if len(layout.files) > 1:
        index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())["weight_map"]
        assert len(set(index.values())) == len(layout.files) and set(index) == set(layout.to_model)


def test_full_fine_tuning_checkpoint_streams_too(bases, rows, tmp_path):
    job = job_for(bases["llama"], rows, "full", "bf16", "none")
    ckpt = checkpoint(job, tmp_path / "ckpt")
    streamed = export(job, ckpt, tmp_path / "streamed")
    export(job.model_copy(update={"export": job.export.model_copy(update={"merge": "in_memory"})}), ckpt, tmp_path / "in_memory")
    got, want = tensors(tmp_path / "streamed"), tensors(tmp_path / "in_memory")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert streamed["checks"]["layers"]["ran"] is False and streamed["checks"]["end_to_end"]["passed"]


def test_the_layer_check_catches_a_merge_into_the_original_weights(bases, rows, tmp_path):
    """The known-bad merge: the adapter added to the base's original W16 instead of the
    dequant(W4) it was trained against. Every 4-bit layer's probes are off by far more than bf16 rounding."""
    job = job_for(bases["llama"], rows, "qlora", "bf16", "nf4", parity_memory="0")
    ckpt = checkpoint(job, tmp_path / "ckpt")
    good = tmp_path / "model"
    record = export(job, ckpt, good)
    assert record["checks"]["layers"]["passed"]
    # rewrite each adapted weight as W16 + (B @ A) * scale
    from jobs.export_stream import delta, read_adapters

    adapters = read_adapters(job, _load(ckpt))
    layout = read_layout(job, architectures.for_model_dir(job.model))
    index = json.loads((good / INDEX_FILE).read_text())["weight_map"]
    for out_file in sorted(set(index.values())):
        with safe_open(str(good / out_file), "pt") as f:
            shard = {k: f.get_tensor(k) for k in f.keys()}
        for key in shard:
            model_key = layout.to_model[key]
            if model_key in adapters:
                w16 = _base_tensor(job, layout, key).to(torch.bfloat16).float()
                shard[key] = (w16 + delta(*adapters[model_key], job)).to(torch.bfloat16)
        save_file(shard, str(good / out_file), metadata={"format": "pt"})
    bad = verify_layers(job, ckpt, good)
    assert not bad["passed"] and len(bad["failed"]) == min(10, bad["layers"])
    assert bad["max_rel_diff"] > 5 * bad["tolerance"], bad  # measured ~0.1 vs a 0.015 tolerance
    assert record["checks"]["layers"]["max_rel_diff"] < bad["tolerance"] / 2


def _load(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / WEIGHTS_FILE))


def _base_tensor(job, layout, key: str) -> torch.Tensor:
    name = next(n for n, keys in layout.files if key in keys)
    with safe_open(str(Path(job.model) / name), "pt") as f:
        return f.get_tensor(key)


def test_end_to_end_check_is_skipped_with_a_reason_when_the_model_does_not_fit(bases, rows, tmp_path):
    job = job_for(bases["qwen2"], rows, "qlora", "bf16", "nf4", parity_memory="1MiB")
    record = export(job, checkpoint(job, tmp_path / "ckpt"), tmp_path / "model")
    e2e = record["checks"]["end_to_end"]
    assert record["passed"] and record["checks"]["layers"]["passed"]
    assert e2e["ran"] is False and "export.parity_memory: 1MiB" in e2e["reason"] and e2e["needs_bytes"] > 2**20
    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "model.partial").exists()


def test_a_checkpoint_that_does_not_match_the_base_fails_naming_the_weights(bases, rows, tmp_path):
    job = job_for(bases["llama"], rows, "lora", "bf16", "none")
    other = job_for(bases["qwen2"], rows, "lora", "bf16", "none")
    ckpt = checkpoint(other, tmp_path / "ckpt")  # qwen2's adapters (biases differ: q/k/v have them)
    save_file({"base_model.model.model.layers.9.mlp.up_proj.lora_A.default.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.9.mlp.up_proj.lora_B.default.weight": torch.zeros(64, 4)}, str(ckpt / WEIGHTS_FILE))
    with pytest.raises(ParityError, match="layers.9.mlp.up_proj"):
        export(job, ckpt, tmp_path / "model")
    assert not (tmp_path / "model").exists()


PEAK = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from orchestrator.config import build_job
    from jobs.merge import export

    def rss(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

    raw, ckpt, out, warm_ckpt, warm_raw = json.loads(sys.argv[1])
    export(build_job(warm_raw)[0], Path(warm_ckpt), Path(out + "-warm"))  # every lazy import done
    torch.set_num_threads(1)
    before = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak, to the current RSS
    record = export(build_job(raw)[0], Path(ckpt), Path(out))
    print(json.dumps({"before": before, "peak": rss("VmHWM:"), "record": record}))
    """
)


def test_streamed_export_memory_does_not_grow_with_the_model(rows, tmp_path):
    """Two QLoRA exports 10x apart in size (3 and 30 layers of the same width, so the same largest tensor),
    both in 16 MB shards: the growth of the process's peak RSS over its RSS before the export (imports done)
    stays the same (one shard's tensors and their fp32 temporaries, plus the adapter), not 10x."""
    from jobs.export_stream import memory_needed

    warm_base = tinymodels.build_tiny_text(tmp_path / "warm", "llama", hidden=64, layers=1)
    warm = job_for(warm_base, rows, "qlora", "bf16", "nf4", parity_memory="0")
    warm_ckpt = checkpoint(warm, tmp_path / "warm-ckpt")
    results = {}
    for name, hidden, layers in (("small", 512, 3), ("large", 512, 30)):
        base = tinymodels.build_tiny_text(tmp_path / name, "llama", hidden=hidden, layers=layers, max_shard_size="16MB")
        job = job_for(base, rows, "qlora", "bf16", "nf4", parity_memory="0")
        ckpt = checkpoint(job, tmp_path / f"{name}-ckpt")
        args = json.dumps([job.model_dump(mode="json"), str(ckpt), str(tmp_path / f"{name}-model"), str(warm_ckpt), warm.model_dump(mode="json")])
        proc = subprocess.run([sys.executable, "-c", PEAK, args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        fp32 = out["record"]["fp32_bytes"]
        results[name] = {"growth": out["peak"] - out["before"], "fp32": fp32, "needed": memory_needed(job, ckpt)}
    small, large = results["small"], results["large"]
    print(json.dumps(results))
    assert large["fp32"] > 8 * small["fp32"]
    assert large["growth"] < 0.3 * large["fp32"], results
    assert large["growth"] < 1.5 * small["growth"] + (16 << 20), results  # not ~10x
    assert large["growth"] < large["needed"], results  # the prediction Ray's scheduler is given is an upper bound


def test_export_dtype_fp32_keeps_what_a_bf16_export_would_round_away(bases, rows, tmp_path):
    """A bf16 run exported in fp32 (export.dtype): the weights are written in fp32, and the merged update is the
    adapter's exactly (a bf16 export rounds an update below its ~0.4% step away)."""
    job = job_for(bases["llama"], rows, "qlora", "bf16", "nf4", dtype="fp32")
    ckpt = checkpoint(job, tmp_path / "ckpt")
    record = export(job, ckpt, tmp_path / "fp32")
    bf16 = export(job.model_copy(update={"export": job.export.model_copy(update={"dtype": "auto"})}), ckpt, tmp_path / "bf16")
    assert record["export_dtype"] == "fp32" and bf16["export_dtype"] == "bf16"
    wide, narrow = tensors(tmp_path / "fp32"), tensors(tmp_path / "bf16")
    assert {t.dtype for t in wide.values() if t.is_floating_point()} == {torch.float32}
    assert all(torch.equal(wide[k].to(torch.bfloat16), narrow[k]) for k in narrow)  # the same merge, rounded once more
    assert record["checks"]["layers"]["max_rel_diff"] < 1e-5 < bf16["checks"]["layers"]["max_rel_diff"]
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("arch", ["llava", "idefics3", "qwen2_vl", "paligemma"])
def test_a_projector_trained_beside_the_adapters_is_exported_and_checked(bases, rows, tmp_path, arch):
    """lora.train_projector (peft's modules_to_save) on a QLoRA run: the streamed export writes the trained
    projector, bit for bit as the in-memory export (merge_and_unload) does, and the end-to-end logits check,
    whose as-trained model holds the trained copy, passes."""
    job = job_for(bases[arch], rows, "qlora", "bf16", "nf4")
    job = job.model_copy(update={"lora": job.lora.model_copy(update={"train_projector": True})})
    ckpt = checkpoint(job, tmp_path / "ckpt")
    with safe_open(str(ckpt / WEIGHTS_FILE), "pt") as f:
        saved = {k.removeprefix("base_model.model.").replace(".modules_to_save.default.", "."): f.get_tensor(k) for k in f.keys() if ".modules_to_save." in k}
    projector = architectures.for_model_dir(job.model).component_of
    assert saved and all(projector(k) == "projector" for k in saved)
    streamed = export(job, ckpt, tmp_path / "streamed")
    in_memory = export(job.model_copy(update={"export": job.export.model_copy(update={"merge": "in_memory"})}), ckpt, tmp_path / "in_memory")
    got, want = tensors(tmp_path / "streamed"), tensors(tmp_path / "in_memory")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert in_memory["checks"]["end_to_end"]["passed"] and streamed["checks"]["end_to_end"]["ran"] and streamed["checks"]["end_to_end"]["passed"], streamed["checks"]["end_to_end"]
    assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in saved.items())  # the trained projector, in the export dtype
