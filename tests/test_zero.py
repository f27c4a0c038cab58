"""Full fine-tuning sharded with DeepSpeed ZeRO over 2 Ray Train workers (gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, build_job

# fp32, same global batch (1 worker x 4 rows vs 2 workers x 2 rows: the same 4 rows each step), same
# seed: only the order of floating-point reductions differs, which moves losses by ~1e-6. A batch drawn
# differently, or a gradient not averaged, moves the first steps' losses by >1e-2.
TRAJECTORY_ATOL = 1e-3


def full_job(world: Path, tmp_path: Path, workers: int, micro: int, deepspeed: dict | None, data: Path | None = None, **train) -> dict:
    """data: a directory with train.parquet and eval.parquet (default: the quickstart's English colours)."""
    files = {"train": str(data / "train.parquet"), "eval": str(data / "eval.parquet")} if data else {
        "train": str(world / "data/english_train.parquet"), "eval": str(world / "data/english_eval.parquet")}
    raw = {
        "name": f"zero-{workers}w",
        "model": str(world / "init"),
        "method": "full",
        "data": {**files, "max_length": 64},
        "precision": "fp32",
        "train": {"max_steps": 12, "micro_batch_size": micro, "lr": 3e-3, "schedule": "constant", "warmup_ratio": 0.0,
                  "eval_every": 1000, "checkpoint_every": 6, "log_every": 1, **train},
        "scaling": {"workers": workers, "cpus_per_worker": 1},
        "output": str(tmp_path / "runs"),
    }
    if deepspeed is not None:
        raw["deepspeed"] = deepspeed
    return raw


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_deepspeed_config_problems(world, tmp_path):
    raw = full_job(world, tmp_path, 2, 8, {"stage": 2, "offload_params": "cpu", "overrides": {"train_batch_size": 64, "bf16": {"enabled": True}}})
    with pytest.raises(ConfigError) as e:
        build_job(raw)
    found = {p.path: p for p in e.value.problems}
    assert "needs ZeRO stage 3" in found["deepspeed.offload_params"].message
    assert "= 16" in found["deepspeed.overrides.train_batch_size"].message
    assert "precision" in found["deepspeed.overrides.bf16.enabled"].fix
    qlora = {**raw, "method": "qlora", "model": str(world / "init"), "deepspeed": {"stage": 3}}
    with pytest.raises(ConfigError) as e:
        build_job(qlora)
    assert any("qlora cannot run under ZeRO-3" in p.message and "method: full" in p.fix for p in e.value.problems)


def test_deepspeed_config_maps_precision_and_records_overrides(world, tmp_path):
    from jobs.zero import ds_config

    raw = full_job(world, tmp_path, 2, 8, {"stage": 3, "offload_optimizer": "cpu", "overrides": {"zero_optimization.reduce_bucket_size": 1000}})
    raw["precision"] = "fp16"
    job, _ = build_job(raw)
    config, changed = ds_config(job, world_size=2)
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0 and not config["bf16"]["enabled"]
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 1
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and config["optimizer"]["type"] == "AdamW"
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert changed == {"zero_optimization.reduce_bucket_size": [None, 1000]}


def mixed_data(world: Path, out: Path) -> Path:
    """The English colours with every other row text-only (no image; its question names the colour, so
    text rows are learnable too) and 17 eval rows (9 and 8 per worker: uneven eval batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", None), ("eval", 17)):
        table = pq.read_table(world / f"data/english_{name}.parquet")
        records = table.to_pylist()[:rows]
        for i, r in enumerate(records):
            if i % 2 == 0:
                r.update(image=None, question=f"what colour is the {r['answer']} ?")
        pq.write_table(pa.Table.from_pylist(records, schema=table.schema), out / f"{name}.parquet")
    return out


# ZeRO-3 keeps parameters below this many elements whole on every rank (DeepSpeed's default: 100k), which
# is every parameter of the tiny model: 0 partitions them all, so every forward gathers them, as for a real one
ZERO3_EVERY_PARAMETER = {"stage": 3, "overrides": {"zero_optimization.stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def trajectories(world, ray_local, tmp_path_factory):
    """12 steps of the same job over data that mixes image rows and text-only rows: one worker, and two
    workers under ZeRO-0, 2 and 3. Two workers' micro batches differ in what they hold (one rank all text
    while the other has an image) and their eval batches in number (5 vs 4). The ZeRO-3 run stops at its
    step-6 checkpoint and is resumed to step 12 (test_zero3_resume_restores_engine_state): its whole
    trajectory, the resumed steps included, must still follow the single worker's."""
    from orchestrator import launch

    tmp = tmp_path_factory.mktemp("zero")
    data = mixed_data(world, tmp / "data")
    runs = {}
    for name, workers, micro, ds in (("single", 1, 4, None), ("zero0", 2, 2, {"stage": 0}), ("zero2", 2, 2, {"stage": 2})):
        job, _ = build_job(full_job(world, tmp / name, workers, micro, ds, data))
        runs[name] = launch.train(job, progress=False)
    first, _ = build_job(full_job(world, tmp / "zero3", 2, 2, ZERO3_EVERY_PARAMETER, data, max_steps=6))
    stopped = launch.train(first, progress=False)
    whole, _ = build_job(full_job(world, tmp / "zero3", 2, 2, ZERO3_EVERY_PARAMETER, data))
    runs["zero3"] = launch.train(whole, resume=stopped.run_dir, progress=False)
    return runs


def image_rows(data_file: Path) -> set[int]:
    import pyarrow.parquet as pq

    return {i for i, cell in enumerate(pq.read_table(data_file, columns=["image"]).column("image").to_pylist()) if cell is not None}


@pytest.mark.slow
def test_ranks_whose_micro_batches_differ_stay_in_step_under_zero3(trajectories):
    """The data this test's runs train on: at some step one rank's micro batch is text-only while the other's
    holds an image, so without a filler image the text-only rank would skip the vision tower's gathers."""
    run_dir = trajectories["zero3"].run_dir
    images = image_rows(Path(trajectories["zero3"].manifest["job"]["data"]["train"]))
    steps = [{json.loads(x)["step"]: json.loads(x)["rows"] for x in (run_dir / "rows" / f"rank-{r}.jsonl").read_text().splitlines()} for r in (0, 1)]
    differ = [s for s in steps[0] if any(bool(images & set(m0)) != bool(images & set(m1)) for m0, m1 in zip(steps[0][s], steps[1][s], strict=True))]
    assert differ, "no step where one rank's micro batch was text-only and the other's had an image"
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event": "eval"' in x]
    assert evals and all(e["eval_examples"] == 17 for e in evals)  # the filler batches count as no example


@pytest.mark.slow
def test_zero2_and_zero3_follow_the_single_worker_trajectory(trajectories):
    single = losses(trajectories["single"].run_dir)
    assert len(single) == 12 and single[12] < single[1] - 0.5  # it learns
    for name in ("zero0", "zero2", "zero3"):
        assert trajectories[name].manifest["parity"]["passed"]  # each stage's checkpoint exports
        sharded = losses(trajectories[name].run_dir)
        assert sharded.keys() == single.keys()
        worst = max(abs(sharded[s] - single[s]) for s in single)
        assert worst <= TRAJECTORY_ATOL, (name, worst)
    config = json.loads((trajectories["zero3"].run_dir / "deepspeed.json").read_text())["config"]
    assert config["zero_optimization"]["stage"] == 3 and config["train_batch_size"] == 4


@pytest.mark.slow
def test_zero3_export_reloads_and_equals_the_gathered_parameters(trajectories):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForImageTextToText

    out = trajectories["zero3"]
    gathered = get_fp32_state_dict_from_zero_checkpoint(out.manifest["checkpoint"])
    reloaded = AutoModelForImageTextToText.from_pretrained(out.model_dir, dtype=torch.float32).state_dict()
    assert set(gathered) <= set(reloaded)
    assert all(torch.equal(gathered[k], reloaded[k]) for k in gathered)
    assert list(out.model_dir.glob("*.safetensors")) and (out.model_dir / "processor_config.json").is_file()


@pytest.mark.slow
def test_zero3_resume_restores_engine_state(trajectories):
    """The ZeRO-3 run was stopped at its step-6 checkpoint and resumed to step 12: the resumed steps reproduce
    the uninterrupted single-worker losses (within the reduction-order noise), so the optimizer state and the
    data position were restored, not restarted."""
    records = [json.loads(x) for x in (trajectories["zero3"].run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r["step"] for r in records if r.get("event") == "start"]
    assert starts == [0, 6]
    uninterrupted = losses(trajectories["single"].run_dir)
    resumed_at = records.index(next(r for r in records if r.get("event") == "start" and r["step"] == 6))
    after = {r["step"]: r["train_loss"] for r in records[resumed_at:] if "train_loss" in r}
    assert sorted(after) == list(range(7, 13))
    assert max(abs(after[s] - uninterrupted[s]) for s in after) <= TRAJECTORY_ATOL


@pytest.mark.slow
def test_rayft_merge_finds_a_zero_runs_newest_checkpoint_and_says_what_it_checked(trajectories, tmp_path):
    """No weights.safetensors in a ZeRO checkpoint: `rayft merge RUN_DIR` picks the newest by its step, and
    the record names the checks that ran (weights present, reload), never a logit comparison it did not make."""
    import shutil

    from conftest import RAYFT

    run_dir = tmp_path / "run"
    shutil.copytree(trajectories["zero3"].run_dir, run_dir)
    proc = subprocess.run([RAYFT, "merge", str(run_dir), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    parity = manifest["parity"]
    assert manifest["metrics"]["step"] == 12 and parity["merge"] == "zero_consolidation"
    assert set(parity["checks"]) == {"weights", "reload"} and parity["passed"]
    assert parity["checks"]["weights"]["passed"] and not parity["checks"]["weights"]["missing"]
    assert "max_abs_logit_diff" not in json.dumps(parity)
    # the re-export kept what the run recorded (timings, attempts) and wrote the manifest once, whole
    assert "timings" in manifest and manifest["attempts"]


@pytest.mark.slow
def test_zero3_bf16_with_optimizer_offload_learns_the_colour_task(world, ray_local, tmp_path):
    from orchestrator import launch

    raw = full_job(world, tmp_path, 2, 8, {"stage": 3, "offload_optimizer": "cpu"}, max_steps=None, epochs=2, eval_every=32, checkpoint_every=64)
    raw["precision"] = "bf16"
    raw["train"]["lr"] = 3e-3
    job, _ = build_job(raw)
    out = launch.train(job, progress=False)
    # from random init (chance: 1/8) to far above; no step-0 eval (eval.at_start is off by default)
    assert out.manifest["metrics"]["initial_eval_accuracy"] is None
    assert out.manifest["metrics"]["eval_accuracy"] > 0.9
    assert out.manifest["parity"]["merged_accuracy"] > 0.9  # the consolidated bf16 export


MULTINODE = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from jobs import stream
from orchestrator import launch
from orchestrator.config import build_job
stream.LOCAL_ROWS = 0  # the Ray Data pass, spread over the nodes, even for these 512 rows
# 2 logical CPUs a node: one for its training worker, one for Ray Data's tasks
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2)
ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
job, _ = build_job(json.loads(sys.argv[1]))
out = launch.train(job, progress=False)
print(json.dumps({"run_dir": str(out.run_dir), "nodes": len(ray.nodes())}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_two_workers_spread_over_two_nodes(world, tmp_path):
    raw = full_job(world, tmp_path, 2, 8, {"stage": 2}, max_steps=4)
    raw["scaling"]["placement"] = "spread"
    proc = subprocess.run([sys.executable, "-c", MULTINODE, json.dumps(raw)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2
    records = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["world_size"] == 2 and start["ray_nodes"] == 2  # one worker on each node
    assert len(losses(Path(result["run_dir"]))) == 4
    # preprocessing ran on both nodes: the validation pass (two 256-row chunks, SPREAD); then the rows were
    # encoded once. (Which nodes a worker's stream tasks land on is Ray's choice: with data.encode_once off
    # and 24 steps, rank 0's three blocks all ran on one node.)
    assert start["validation"]["train"] == {"cached": False, "nodes": 2, "encoded_once": True}, start["validation"]


def test_deepspeed_typo_gets_a_suggestion(world, tmp_path):
    with pytest.raises(ConfigError) as e:
        build_job(full_job(world, tmp_path, 2, 8, {"stgae": 3}))
    assert any(p.path == "deepspeed.stgae" and "did you mean `stage`" in p.fix for p in e.value.problems)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "quant", "deepspeed"), [("qlora", "nf4", {"stage": 2}), ("lora", "none", None)])
def test_adapters_data_parallel_over_two_workers(quickstart_run, ray_local, tmp_path, method, quant, deepspeed):
    """qlora under ZeRO-2 (allowed because this passes) and lora under plain DDP, 2 workers x 8 rows."""
    from orchestrator import launch
    from orchestrator.config import apply_overrides, load_raw

    raw = load_raw(Path(quickstart_run["root"]) / "jobs" / "qlora.yaml")
    raw = apply_overrides(
        raw,
        {"method": method, "quantization.type": quant, "scaling": {"workers": 2, "cpus_per_worker": 1},
         "deepspeed": deepspeed, "train.micro_batch_size": 8, "output": str(tmp_path / "runs")},
    )
    job, _ = build_job(raw)
    out = launch.train(job, progress=False)
    if deepspeed:  # every rank's shard holds the adapter and its optimizer state, never the frozen base
        import torch

        ckpt = Path(out.manifest["checkpoint"])
        adapter = (ckpt / "weights.safetensors").stat().st_size
        (states,) = ckpt.glob("step_*/mp_rank_00_model_states.pt")
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        frozen = [k for k in module if k.endswith((".weight", ".bias")) and "lora_" not in k]
        assert not frozen, frozen[:5]
        assert states.stat().st_size < 3 * adapter, (states.stat().st_size, adapter)  # (4-bit quant-state buffers beside it)
    assert out.manifest["metrics"]["initial_eval_accuracy"] <= 1 / 8
    assert out.manifest["metrics"]["eval_accuracy"] > 0.9
    assert out.manifest["parity"]["passed"] and out.manifest["parity"]["merged_accuracy"] > 0.9
