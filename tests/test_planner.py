"""The memory planner: counts against real models, the 7B reference table, `rayft plan`, and the fit check
that `rayft train` / `rayft tune` run before anything launches."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import RAYFT

from orchestrator import config, planner, tinymodels
from orchestrator.cli import main
from orchestrator.config import apply_overrides, build_job

GB = 10**9

# The reference page's 7B table, under stated assumptions: a Llama-2-7B-shaped model, fp16, micro batch 1 x
# 512 tokens, no gradient checkpointing, LoRA rank 16 on every attention and MLP projection with dropout 0
# (peft's dropout copies each adapted input: +1.75 GB at this size), AdamW, one 80 GB GPU.
REFERENCE_7B = ["precision=fp16", "train.micro_batch_size=1", "data.max_length=512", "lora.dropout=0"]


def seven_b() -> dict[str, planner.Plan]:
    """`rayft plan --model 7B` with the reference assumptions: the job (the schema's default method, qlora)
    and its alternatives, by label."""
    job, _ = build_job({"model": "7B", "data": {"train": "x.jsonl"}}, REFERENCE_7B, local_files=False)
    shape = planner.load_shape("7B")
    return {
        p.label: p
        for p in planner.compare(job, shape, planner.Budget("gpu", 80 * 2**30, "test", per_worker=True)).rows
    }


def test_7b_reproduces_the_reference_table():
    shape = planner.load_shape("7B")
    n = shape.total_params
    assert 6.7e9 < n < 6.8e9  # Llama-2-7B: 6,738,415,616
    # weights by storage: 28 GB fp32, 14 GB fp16, about 3.5 GB NF4 (for a nominal 7e9 parameters)
    assert 26 * GB < 4 * n < 28.5 * GB
    assert 13 * GB < 2 * n < 14.5 * GB
    assert (
        3.3 * GB
        < planner.four_bit_bytes(n, double_quant=True)
        < planner.four_bit_bytes(n, double_quant=False)
        < 4.0 * GB
    )
    rows = seven_b()
    qlora, full, lora = rows["job: qlora nf4+dq fp16 mb1"], rows["full fp16 mb1"], rows["lora fp16 mb1"]
    # full fine-tuning, fp16: "56+ GB". Mixed-precision AdamW holds 16 bytes per parameter (fp32 weights,
    # gradients and two moments), twice the page's 56 GB (8 bytes per parameter).
    assert full.weights + full.gradients + full.optimizer == 16 * n
    assert full.total > 56 * GB
    assert 16 * GB <= lora.total <= 20 * GB  # LoRA over an fp16 base: 16-20 GB
    assert 8 * GB <= qlora.total <= 12 * GB  # QLoRA: 8-12 GB
    assert (
        3.3 * GB < qlora.weights < 4.5 * GB
    )  # NF4 base (embeddings and lm_head stay 16-bit) + fp32 adapters
    for p in (lora, qlora):  # LoRA rank 16: 0.3-0.7% trainable (~20-50M)
        assert 0.003 < p.trainable_params / n < 0.007 and 20e6 < p.trainable_params < 50e6


def test_7b_breakdown_follows_the_job():
    base = seven_b()["lora fp16 mb1"]
    with_dropout, _ = build_job(
        {"model": "7B", "data": {"train": "x.jsonl"}},
        [*REFERENCE_7B, "lora.dropout=0.05", "method=lora"],
        local_files=False,
    )
    shape = planner.load_shape("7B")
    dropout = planner.plan(with_dropout, shape, "gpu")
    assert dropout.activations > base.activations and dropout.weights == base.weights
    checkpointed = planner.plan(
        with_dropout.model_copy(
            update={"train": with_dropout.train.model_copy(update={"gradient_checkpointing": True})}
        ),
        shape,
        "gpu",
    )
    assert checkpointed.activations < base.activations / 4
    zero3 = [
        p
        for p in planner.compare(with_dropout, shape, planner.Budget("gpu", None, "test"), gpus=8).rows
        if "ZeRO-3 x8" in p.label
    ][0]
    full = planner.plan(with_dropout.model_copy(update={"method": "full"}), shape, "gpu")
    assert zero3.workers == 8 and zero3.weights + zero3.gradients + zero3.optimizer == pytest.approx(
        (full.weights + full.gradients + full.optimizer) / 8, rel=0.01
    )


def real_counts(model_dir: Path, job) -> tuple[int, int]:
    """(parameters of the base as transformers loads it, trainable parameters once peft attaches LoRA)."""
    import torch

    from jobs.model import build_model, load_base
    from orchestrator import architectures

    arch = architectures.for_model_dir(model_dir)
    base = sum(
        p.numel()
        for p in load_base(job.model_copy(update={"method": "full"}), arch, torch.device("cpu")).parameters()
    )
    adapted = build_model(job, arch, torch.device("cpu"))
    return base, sum(p.numel() for p in adapted.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2_vl"])
def test_counts_equal_the_real_tiny_models(name, world, tmp_path):
    """config.json -> the planner's parameter and LoRA counts, against transformers + peft on the same model."""
    model_dir = world / "init" if name == "llava" else tinymodels.TINY_VLMS[name](tmp_path / name)
    shape = planner.load_shape(str(model_dir))
    for train_vision in (False, True):
        job, _ = build_job(
            {
                "model": str(model_dir),
                "data": {"train": "x.jsonl"},
                "method": "lora",
                "lora": {"rank": 8, "train_vision": train_vision},
            },
            local_files=False,
        )
        total, trainable = real_counts(model_dir, job)
        assert shape.total_params == total
        assert planner.plan(job, shape, "cpu").trainable_params == trainable


@pytest.mark.parametrize(
    ("method", "quant", "double_quant"),
    [("full", "none", True), ("lora", "none", True), ("qlora", "nf4", True), ("qlora", "fp4", False)],
)
def test_weight_bytes_equal_the_loaded_model(world, method, quant, double_quant):
    """Storage by method: fp32 master weights (full), a bf16 base + fp32 adapters (lora), packed 4-bit
    weights + bitsandbytes' quantization state (qlora, with and without double quantization)."""
    import torch

    from jobs.model import build_model, parameter_bytes
    from orchestrator import architectures

    raw = {
        "model": str(world / "init"),
        "data": {"train": "x.jsonl"},
        "method": method,
        "quantization": {"type": quant, "double_quant": double_quant},
    }
    job, _ = build_job(raw, local_files=False)
    model = build_model(job, architectures.for_model_dir(job.model), torch.device("cpu"))
    assert planner.plan(job, planner.load_shape(job.model), "cpu").weights == parameter_bytes(model)


def test_plan_cli_prints_the_table_and_a_recommendation_without_torch():
    args = ["plan", "--model", "7B", "--gpu-mem", "24GiB", *(x for s in REFERENCE_7B for x in ("--set", s))]
    code = (
        "import sys\nfrom orchestrator.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 5.0
    out = proc.stdout
    assert "memory per GPU: 24.00 GiB (--gpu-mem)" in out
    assert "micro batch 1 x 512 tokens" in out
    header = next(line for line in out.splitlines() if line.startswith("configuration"))
    for column in ("trainable", "weights", "grads", "optimizer", "activations", "overhead", "total", "fits"):
        assert column in header
    rows = {
        line.split("  ")[0]: line for line in out.splitlines() if line.startswith(("job:", "full", "lora"))
    }
    assert (
        rows["job: qlora nf4+dq fp16 mb1"].endswith("yes") and "(0.59%)" in rows["job: qlora nf4+dq fp16 mb1"]
    )
    assert rows["full fp16 mb1"].endswith("no") and rows["lora fp16 mb1"].endswith("yes")
    assert "recommendation: the job as it is" in out

    # a full job on a 24 GiB GPU: the cheapest change that fits keeps full fine-tuning (ZeRO-3 + offload on one GPU)
    full = subprocess.run([RAYFT, *args, "--set", "method=full"], capture_output=True, text=True, timeout=60)
    assert full.returncode == 0, full.stderr
    assert "recommendation: full fp16 ZeRO-3 x1 offload optimizer+params" in full.stdout
    assert "--set deepspeed.stage=3" in full.stdout
    # eight GPUs: sharding alone fits
    eight = subprocess.run(
        [RAYFT, *args, "--set", "method=full", "--gpus", "8"], capture_output=True, text=True, timeout=60
    )
    assert "recommendation: full fp16 ZeRO-3 x8 mb1" in eight.stdout, eight.stdout


def test_plan_cli_refuses_bad_input(tmp_path):
    runner = CliRunner()
    for args, expected in (
        (["plan"], "give a job file or --model"),
        (["plan", "--model", "12Q"], "neither a model directory"),
        (["plan", "--model", "7B", "--gpu-mem", "lots"], "give a size with a unit"),
    ):
        result = runner.invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 2 and expected in result.output, result.output


def fit_job(world: Path, tmp_path: Path) -> Path:
    """The quickstart's full fine-tuning job, with a data column that does not exist: a run that gets past
    the fit check stops at the data preflight (exit 2, before Ray starts)."""
    body = {
        "name": "fit",
        "model": str(world / "init"),
        "method": "full",
        "precision": "bf16",
        "data": {
            "train": str(world / "data/english_train.parquet"),
            "prompt": "no_such_column",
            "max_length": 64,
        },
        "train": {"micro_batch_size": 16},
        "output": str(tmp_path / "runs"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_train_refuses_a_job_predicted_not_to_fit(world, tmp_path):
    path = fit_job(world, tmp_path)
    job, _ = build_job(yaml.safe_load(path.read_text()), local_files=False)
    predicted = planner.plan(job, planner.load_shape(job.model), planner.budget_for(job).device).total
    limit = ["--memory-limit", f"{predicted - 1}B"]  # one byte short
    runner = CliRunner()

    refused = runner.invoke(main, ["train", str(path), *limit], catch_exceptions=False)
    assert refused.exit_code == 2
    assert f"predicted {predicted / 2**30:.2f} GiB per" in refused.output
    assert "GiB available (--memory-limit)" in refused.output
    assert "cheapest change that fits: set train.gradient_checkpointing: true" in refused.output
    assert "no_such_column" not in refused.output  # refused before reading the data

    forced = runner.invoke(main, ["train", str(path), *limit, "--no-fit-check"], catch_exceptions=False)
    assert forced.exit_code == 2 and "missing column `no_such_column`" in forced.output
    assert "predicted" not in forced.output

    # the named fix, typed as the message suggests, passes the same check
    fix = next(line for line in refused.output.splitlines() if "e.g. --set" in line).split("e.g. ")[1].split()
    fixed = runner.invoke(main, ["train", str(path), *limit, *fix], catch_exceptions=False)
    assert fixed.exit_code == 2 and "missing column `no_such_column`" in fixed.output, fixed.output

    hopeless = runner.invoke(main, ["train", str(path), "--memory-limit", "1MiB"], catch_exceptions=False)
    assert hopeless.exit_code == 2 and "no configuration rayft knows fits" in hopeless.output


def test_tune_refuses_a_search_no_trial_of_which_fits(world, tmp_path):
    path = fit_job(world, tmp_path)
    body = yaml.safe_load(path.read_text())
    body["data"]["prompt"] = "question"
    body["tune"] = {"space": {"train.micro_batch_size": {"choice": [16, 32]}}}
    path.write_text(yaml.safe_dump(body))
    result = CliRunner().invoke(main, ["tune", str(path), "--memory-limit", "1MiB"], catch_exceptions=False)
    assert result.exit_code == 2
    assert (
        "no trial of the search is predicted to fit" in result.output
        and "GiB available (--memory-limit)" in result.output
    )
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_trial_predicted_not_to_fit_is_recorded_as_skipped(world, tmp_path):
    """The seam between Ray Tune and the planner (orchestrator.trial.trial_fits, called by every trial
    before it launches workers) and the results table it feeds."""
    from orchestrator import search, trial
    from orchestrator.config import to_yaml

    path = fit_job(world, tmp_path)
    body = yaml.safe_load(path.read_text())
    body["tune"] = {"space": {"lora.rank": {"grid": [4, 1024]}}}
    job, _ = build_job(body, local_files=False)
    search_dir = tmp_path / "search"
    trials = {"small": {"lora.rank": 4}, "big": {"lora.rank": 1024}}
    jobs = {
        name: build_job(apply_overrides(body, {"method": "lora", **overrides}), local_files=False)[0]
        for name, overrides in trials.items()
    }
    totals = {
        name: planner.plan(trial, planner.load_shape(trial.model), "cpu").total
        for name, trial in jobs.items()
    }
    budget = planner.Budget("cpu", (totals["small"] + totals["big"]) // 2, "test", per_worker=True)
    for name, overrides in trials.items():
        trial_dir = search_dir / "trials" / name
        trial_dir.mkdir(parents=True)
        (trial_dir / "overrides.json").write_text(json.dumps(overrides))
        assert trial.trial_fits(jobs[name], trial_dir, budget) == (name == "small")
    (search_dir / "tune.yaml").write_text(to_yaml(job))
    summary = search.summarize(search_dir)
    status = {t["trial"]: (t["status"], t["reason"]) for t in summary["trials"]}
    assert (
        status["big"][0] == "skipped"
        and "predicted" in status["big"][1]
        and "GiB available" in status["big"][1]
    )
    assert status["small"][0] != "skipped"
    table = search.write_report(search_dir, summary).results_md
    assert "| skipped: predicted" in table


def test_sizes_parse():
    assert config.parse_size("24GiB") == 24 * 2**30
    assert config.parse_size("80 GB") == 80 * 10**9
    assert config.parse_size("1.5mib") == int(1.5 * 2**20)
    with pytest.raises(ValueError):
        config.parse_size("24")


# Published config.json files as they are on the hub: sparse (keys left at transformers' defaults) and, for
# Qwen2-VL, the flat legacy layout (text keys at the top level).
LLAVA_15_7B = {
    "model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "tie_word_embeddings": False, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}  # fmt: skip
QWEN2_VL_2B = {
    "model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "vocab_size": 151936, "image_token_id": 151655, "video_token_id": 151656,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}  # fmt: skip


@pytest.mark.parametrize("config", [LLAVA_15_7B, QWEN2_VL_2B], ids=["llava-1.5-7b", "qwen2-vl-2b"])
def test_counts_of_published_configs_equal_transformers(config):
    """Billions of parameters, counted on the meta device (no memory) against the planner's config.json count."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config))
    assert planner.shape_from_config(config).total_params == sum(p.numel() for p in model.parameters())


def test_a_deepspeed_auto_override_is_planned_as_deepspeeds_default():
    """HF-style DeepSpeed configs say "auto" for sizes DeepSpeed chooses itself."""
    job, _ = build_job({"model": "7B", "data": {"train": "x.jsonl"}, "method": "full",
                        "deepspeed": {"stage": 2, "overrides": {"zero_optimization.reduce_bucket_size": "auto"}}}, local_files=False)
    default, _ = build_job({"model": "7B", "data": {"train": "x.jsonl"}, "method": "full", "deepspeed": {"stage": 2}}, local_files=False)
    shape = planner.load_shape("7B")
    assert planner.plan(job, shape, "gpu").total == planner.plan(default, shape, "gpu").total


def test_max_pixels_caps_a_dynamic_resolution_models_vision_activations(tmp_path):
    """Qwen2-VL's image tokens follow the image's pixels: without data.max_pixels the planner must assume a row's
    every token is an image token (max_length x merged patches); with it, each image's patches are capped at
    max_pixels / patch_size^2, and the predicted activations shrink. A fixed-size model (LLaVA) is unaffected."""
    from orchestrator.planner.memory import dynamic_patches

    qwen = tinymodels.TINY_VLMS["qwen2_vl"](tmp_path / "qwen")
    raw = {"model": str(qwen), "data": {"train": "x.parquet", "max_length": 4096}, "method": "full"}
    shape = planner.load_shape(str(qwen))
    jobs = {px: build_job(apply_overrides(raw, {"data.max_pixels": px}), local_files=False)[0] for px in (None, 64 * 64)}
    assert dynamic_patches(jobs[None], shape) == 4 * 4096 and dynamic_patches(jobs[64 * 64], shape) == 64 * 64 // 8**2
    assert planner.plan(jobs[64 * 64], shape, "cpu").total < planner.plan(jobs[None], shape, "cpu").total
    llava = tinymodels.TINY_VLMS["llava"](tmp_path / "llava")
    raw = {**raw, "model": str(llava)}
    fixed = [planner.plan(build_job(apply_overrides(raw, {"data.max_pixels": px}), local_files=False)[0], planner.load_shape(str(llava)), "cpu").total for px in (None, 64 * 64)]
    assert fixed[0] == fixed[1]
