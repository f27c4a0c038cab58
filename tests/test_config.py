"""The job schema and its checks: what a user sees from `rayft validate`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator import tinymodels
from orchestrator.cli import main
from orchestrator.config import ConfigError, JobConfig, apply_overrides, build_job, load_job, load_raw

REPO = Path(__file__).resolve().parent.parent


def write_job(tmp_path: Path, world: Path, **changes) -> Path:
    body = {
        "name": "t",
        "model": str(world / "init"),
        "data": {"train": str(world / "data/english_train.parquet"), "eval": str(world / "data/english_eval.parquet")},
        "method": "qlora",
    }
    body = apply_overrides(body, changes)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def problems(path: Path, *sets: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        load_job(path, sets)
    return {p.path: f"{p.message} | {p.fix}" for p in e.value.problems}


def test_shipped_job_files_validate(world, tmp_path):
    """Every job file in the repo: examples/ (pointed at a built quickstart tree) and the quickstart's own."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "quickstart").symlink_to(world)
    (world / "base").exists() or shutil.copytree(world / "init", world / "base")
    shipped = sorted((tmp_path / "examples").glob("*.yaml")) + sorted((world / "jobs").glob("*.yaml"))
    assert len(shipped) >= 6
    for path in shipped:
        job, _ = load_job(path)
        assert Path(job.model).is_dir() and Path(job.data.train).is_file(), path


def test_shipped_data_layout_examples_pass_the_row_checks(world, tmp_path):
    """examples/data-*.yaml, one per data layout (docs/data.md names each): every row of their files passes
    the checks the validation pass runs (conversation, images decode), in this process."""
    from jobs.data import check_rows

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "quickstart").symlink_to(world)
    (world / "base").exists() or shutil.copytree(world / "init", world / "base")
    layouts = sorted((tmp_path / "examples").glob("data-*.yaml"))
    assert len(layouts) >= 6
    docs = (REPO / "docs/data.md").read_text()
    for path in layouts:
        assert f"examples/{path.name}" in docs, f"docs/data.md does not name examples/{path.name}"
        job, _ = load_job(path)
        assert check_rows(job.data.train, job.data, True) > 0, path


def test_defaults_live_in_the_schema(world, tmp_path):
    job, _ = load_job(write_job(tmp_path, world))
    assert (job.method, job.quantization.type, job.precision, job.lora.rank) == ("qlora", "nf4", "bf16", 16)
    full, _ = load_job(write_job(tmp_path, world, method="full"))
    assert full.quantization.type == "none"  # a base is 4-bit only for qlora
    # workers rebuild the same object from a plain dict
    assert JobConfig.model_validate(job.model_dump(mode="json")) == job


def test_relative_paths_resolve_against_the_job_file(world, tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copytree(world / "data", tmp_path / "sub" / "data")
    path = write_job(tmp_path / "sub", world, **{"data.train": "data/english_train.parquet", "data.eval": None})
    job, _ = load_job(path)
    assert job.data.train == str((tmp_path / "sub/data/english_train.parquet").resolve())


def test_set_overrides_keep_types(world, tmp_path):
    job, _ = load_job(write_job(tmp_path, world), ["train.lr=1e-4", "lora.rank=8", "data.blind=true", "lora.targets=[q_proj, v_proj]"])
    assert job.train.lr == 1e-4 and job.lora.rank == 8 and job.data.blind is True
    assert job.lora.targets == ["q_proj", "v_proj"]


def test_every_problem_is_reported_at_once(world, tmp_path):
    found = problems(
        write_job(tmp_path, world, **{"train.lr": -1, "lora.rnak": 8, "precision": "fp8", "trian": {}}),
    )
    assert set(found) == {"train.lr", "lora.rnak", "precision", "trian"}
    assert "did you mean `rank`" in found["lora.rnak"]
    assert "did you mean `train`" in found["trian"]
    assert "'bf16', 'fp16' or 'fp32'" in found["precision"]


def test_qlora_without_4bit_and_quantized_full_are_refused(world, tmp_path):
    found = problems(write_job(tmp_path, world, **{"quantization.type": "none"}))
    assert "qlora needs a 4-bit base" in found["quantization.type"] and "nf4" in found["quantization.type"]
    found = problems(write_job(tmp_path, world, method="full", **{"quantization.type": "fp4"}))
    assert "applies to qlora only" in found["quantization.type"] and "method: qlora" in found["quantization.type"]


def test_missing_model_and_data_files_are_named(world, tmp_path):
    found = problems(write_job(tmp_path, world, model=str(tmp_path / "nope"), **{"data.eval": str(tmp_path / "e.parquet"), "data.train": str(tmp_path / "t.csv")}))
    assert "not a local directory" in found["model"]
    assert "file not found" in found["data.eval"]
    assert "unsupported file type" in found["data.train"]


def test_architecture_capabilities_are_enforced(world, tmp_path):
    nvila = tmp_path / "nvila"
    nvila.mkdir()
    (nvila / "config.json").write_text('{"model_type": "nvila_lite"}')
    for method in ("lora", "qlora"):
        found = problems(write_job(tmp_path, world, model=str(nvila), method=method, **{"quantization.type": "nf4" if method == "qlora" else "none"}))
        assert "NVILA-Lite supports full fine-tuning only" in found["method"] and "use method: full" in found["method"]
    job, _ = load_job(write_job(tmp_path, world, model=str(nvila), method="full"))
    assert job.method == "full"


def test_packing_is_refused_before_launch_where_it_cannot_run(world, tmp_path):
    """data.batching: packed needs a token budget, and an architecture whose packed positions rayft has checked."""
    path = write_job(tmp_path, world)
    assert "batching: packed needs a token budget" in problems(path, "data.batching=packed")["data.batch_tokens"]
    assert "the longest row would not fit" in problems(path, "data.batching=packed", "data.batch_tokens=8")["data.batch_tokens"]
    nvila = tmp_path / "nvila"
    nvila.mkdir()
    (nvila / "config.json").write_text('{"model_type": "nvila_lite"}')
    found = problems(path, f"model={nvila}", "method=full", "quantization.type=none", "data.batching=packed", "data.batch_tokens=4096")
    assert "nvila_lite cannot pack rows" in found["data.batching"] and "use data.batching: tokens" in found["data.batching"]
    job, _ = load_job(path, ["data.batching=packed", "data.batch_tokens=4096"])
    assert job.data.batching == "packed"


def test_fp16_on_cpu_warns(world, tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.config.checks.gpu_present", lambda: False)
    _, warnings = load_job(write_job(tmp_path, world, precision="fp16"))
    assert any("tens of times slower than bf16" in w for w in warnings)


def test_cli_validate_prints_config_or_problems(world, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", str(write_job(tmp_path, world)), "--set", "lora.rank=4", "--no-data"], catch_exceptions=False)
    assert ok.exit_code == 0
    assert yaml.safe_load(ok.output)["lora"]["rank"] == 4
    bad = runner.invoke(main, ["validate", str(write_job(tmp_path, world, method="full", **{"quantization.type": "nf4", "train.epochs": 0}))], catch_exceptions=False)
    assert bad.exit_code == 2
    assert "2 problem(s)" in bad.output and "train.epochs" in bad.output and "quantization.type" in bad.output
    assert "fix:" in bad.output
    missing = runner.invoke(main, ["validate", str(tmp_path / "none.yaml")], catch_exceptions=False)
    assert missing.exit_code == 2 and "job file not found" in missing.output
    malformed = runner.invoke(main, ["validate", str(write_job(tmp_path, world)), "--set", "train.lr"], catch_exceptions=False)
    assert malformed.exit_code == 2 and "key.path=value" in malformed.output


def test_build_job_takes_a_mapping(world):
    job, _ = build_job({"model": str(world / "init"), "data": {"train": str(world / "data/english_train.parquet")}})
    assert job.name == "job"


def test_schema_errors_echo_the_value_and_say_what_is_allowed(world, tmp_path):
    path = write_job(tmp_path, world)
    found = problems(path, "lora.rank=0", "train.lr=-0.1", "train.epochs=abc", "precision=fp64")
    found.update(problems(path, "lora=8"))
    assert found["lora.rank"] == "0 is out of range: must be >= 1 and <= 1024 | set lora.rank to a whole number from 1 to 1024"
    assert found["train.lr"] == "-0.1 is out of range: must be > 0 and <= 1 | set train.lr to a number > 0 and <= 1"
    assert found["train.epochs"] == "got 'abc': expected a whole number | set train.epochs to a whole number, e.g. 3"
    assert found["precision"] == "got 'fp64': expected 'bf16', 'fp16' or 'fp32' | use 'bf16', 'fp16' or 'fp32'"
    assert found["lora"] == "lora is a section of keys (rank, alpha, dropout, ...), got 8 | set one of its keys, e.g. --set lora.rank=16"
    for text in found.values():
        message, fix = text.split(" | ")
        assert message and fix, text
        assert not any(word in text for word in ("LoraConfig", "TrainConfig", "DataConfig", "Input should be")), text


def test_every_schema_error_has_a_fix(world, tmp_path):
    found = problems(write_job(tmp_path, world), "name=a b", "deepspeed=3", "freeze=x", "data.blind=maybe", "lora.targets=5", "submit.ship=[x]")
    assert len(found) == 7  # lora.targets fails both members of its union
    for text in found.values():
        message, fix = text.split(" | ")
        assert message and fix, text
        assert "Config" not in text and "Input should be" not in text, text
    assert found["name"].endswith("see its doc: Run name: the run directory is <output>/<name>-<timestamp>.")
    assert "deepspeed is a section of keys (stage, " in found["deepspeed"]


def test_size_and_duration_keys_read_as_numbers_reach_their_own_parser(world, tmp_path):
    """`export.parity_memory: 0` (skip the export's logits check) as YAML and `--set` read it: a number."""
    job, _ = load_job(write_job(tmp_path, world, **{"export.parity_memory": 0}))
    assert job.export.parity_bytes() == 0
    job, _ = load_job(write_job(tmp_path, world), ["export.parity_memory=0"])
    assert job.export.parity_bytes() == 0
    found = problems(write_job(tmp_path, world, **{"export.parity_memory": 64, "tune": {"memory_budget": 16, "budget": {"wall": 3600}, "space": {"train.lr": {"grid": [1e-3]}}}}))
    assert "give a size with a unit" in found["export.parity_memory"] and "give a size with a unit" in found["tune.memory_budget"]
    assert "give a duration such as 2h" in found["tune.budget.wall"]


def test_off_and_on_in_a_job_file_or_set_mean_the_options_values_not_booleans(world, tmp_path):
    """YAML 1.1 reads `off`/`on`/`yes`/`no` as booleans; the documented values `gpu: off` and `encode_once: off` are words."""
    path = write_job(tmp_path, world)
    path.write_text(path.read_text() + "scaling: {gpu: off}\n")
    job = load_job(path, ["data.encode_once=off", "data.blind=true"])[0]
    assert (job.scaling.gpu, job.data.encode_once, job.data.blind) == ("off", "off", True)
    assert "no CUDA GPU is visible" in problems(path, "scaling.gpu=on")["scaling.gpu"]  # read as "on" (no GPU here)
    assert "scaling.gpu" in problems(path, "scaling.gpu=yes")  # a word the option does not take is named, not read as true


def test_flash_attention_2_is_refused_before_launch_where_it_cannot_run(world, tmp_path):
    path = write_job(tmp_path, world)
    fa2 = "train.attn_implementation=flash_attention_2"
    assert "needs a CUDA GPU" in problems(path, fa2, "scaling.gpu=off")["train.attn_implementation"]
    assert "bf16 or fp16 only" in problems(path, fa2, "precision=fp32")["train.attn_implementation"]
    assert "expected 'auto', 'sdpa', 'flash_attention_2' or 'eager'" in problems(path, "train.attn_implementation=flash")["train.attn_implementation"]
    job, _ = build_job(load_raw(path), [fa2, "precision=bf16"], cluster=True)  # a cluster's workers are checked where they run
    assert job.train.attn_implementation == "flash_attention_2"


def test_a_pixel_budget_whose_floor_is_above_its_ceiling_is_refused(world, tmp_path):
    path = write_job(tmp_path, world)
    got = problems(path, "data.max_pixels=1000", "data.min_pixels=2000")
    assert "above data.max_pixels=1000" in got["data.min_pixels"]
    assert "data.max_pixels" in problems(path, "data.max_pixels=0")  # at least 1


def test_freeze_and_learning_rates_by_component_are_checked_against_the_model_and_method(world, tmp_path):
    path = write_job(tmp_path, world)  # LLaVA
    got = problems(path, "method=lora", "quantization.type=none", "train.lr_groups.projector=1e-4", "train.lr_groups.vision=1e-5")
    assert "no projector weight trains" in got["train.lr_groups.projector"] and "lora.train_vision: true" in got["train.lr_groups.vision"]
    got = problems(path, "method=full", "quantization.type=none", "freeze=[vision]", "train.lr_groups.vision=1e-5")
    assert "vision is frozen" in got["train.lr_groups.vision"]
    assert "'vision', 'projector' or 'language'" in problems(path, "train.lr_groups.audio=1e-5")["train.lr_groups.audio"]
    job = load_job(path, ["method=full", "quantization.type=none", "freeze=[vision]", "train.lr_groups.projector=1e-4"])[0]
    assert job.freeze == ["vision"] and job.train.lr_groups == {"projector": 1e-4}
    text = tinymodels.build_tiny_text(tmp_path / "llama")
    assert "llama has no vision component" in problems(path, f"model={text}", "method=full", "quantization.type=none", "freeze=[vision]")["freeze"]


def test_a_search_space_takes_a_components_learning_rate(world, tmp_path):
    from orchestrator.config import load_search

    path = write_job(tmp_path, world, method="full", **{"quantization.type": "none"})
    body = yaml.safe_load(path.read_text())
    body["tune"] = {"space": {"train.lr_groups.projector": {"loguniform": [1e-5, 1e-3]}, "train.lr_groups.vision": {"choice": [1e-6, 2.0]}}}
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError) as e:
        load_search(path)
    said = [str(p) for p in e.value.problems]
    assert len(said) == 1 and "tune.space.train.lr_groups.vision" in said[0] and "value 2.0" in said[0], said
    body["tune"]["space"]["train.lr_groups.vision"] = {"choice": [1e-6, 1e-5]}
    path.write_text(yaml.safe_dump(body))
    _, base, _ = load_search(path)
    assert "lr_groups" not in base.get("train", {})  # each trial sets its own


def test_training_the_projector_beside_adapters_is_checked_and_opens_its_learning_rate(world, tmp_path):
    path = write_job(tmp_path, world)  # LLaVA, qlora
    job = load_job(path, ["lora.train_projector=true", "train.lr_groups.projector=1e-4"])[0]
    assert job.lora.train_projector and job.train.lr_groups == {"projector": 1e-4}
    assert "applies to lora/qlora" in problems(path, "method=full", "quantization.type=none", "lora.train_projector=true")["lora.train_projector"]
    text = tinymodels.build_tiny_text(tmp_path / "llama")
    assert "llama has no projector" in problems(path, f"model={text}", "lora.train_projector=true")["lora.train_projector"]
