"""The data path on Ray Data: the batch schedule, the parallel validation pass, streamed encoding on every
architecture, bounded memory, exact mid-epoch resume, length-aware batching and one validation per search.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jobs import batching
from orchestrator import tinymodels
from orchestrator.config import DataConfig, TrainConfig, apply_overrides, build_job, load_raw


def schedule(n: int, world: int, micro: int, lengths=None, epochs: int = 2, **data):
    lengths = np.asarray(lengths if lengths is not None else [10] * n)
    return batching.build_schedule(np.arange(n), lengths, TrainConfig(epochs=epochs, micro_batch_size=micro), DataConfig(train="x.parquet", **data), world)


def epoch_rows(s: batching.Schedule, e: int) -> list[int]:
    end = s.epoch_starts[e + 1] if e + 1 < len(s.epoch_starts) else s.total_steps
    return [int(i) for step in s.steps[s.epoch_starts[e] : end] for micro in step for part in micro for i in part]


@pytest.mark.parametrize("batching_mode", ["rows", "length_grouped", "tokens"])
def test_every_row_once_per_epoch_and_a_seed_fixes_the_order(batching_mode):
    rng = random.Random(0)
    lengths = [rng.randint(20, 120) for _ in range(1000)]
    extra = {"batch_tokens": 640} if batching_mode == "tokens" else {}
    s = schedule(1000, 2, 8, lengths, batching=batching_mode, **extra)
    for e in range(2):
        rows = epoch_rows(s, e)
        assert len(rows) == len(set(rows))  # none twice
        assert len(rows) >= 1000 - 32  # at most the end of the epoch that fills no step is left out
    assert epoch_rows(s, 0) != epoch_rows(s, 1)  # each epoch its own permutation
    again = schedule(1000, 2, 8, lengths, batching=batching_mode, **extra)
    assert all(np.array_equal(a, b) for x, y in zip(s.steps, again.steps, strict=True) for p, q in zip(x, y, strict=True) for a, b in zip(p, q, strict=True))
    if batching_mode == "tokens":
        assert all(len(part) * max(lengths[i] for i in part) <= 640 for step in s.steps for micro in step for part in micro)


def test_n_workers_see_the_rows_one_worker_sees_with_an_n_times_larger_batch():
    one, two = schedule(64, 1, 16), schedule(64, 2, 8)
    assert one.total_steps == two.total_steps == 8
    for a, b in zip(one.steps, two.steps, strict=True):
        assert list(a[0][0]) == [*b[0][0], *b[0][1]]


def test_length_grouping_cuts_padding():
    rng = random.Random(1)
    lengths = np.array([rng.randint(20, 200) for _ in range(2000)])
    fractions = {}
    for mode, extra in (("rows", {}), ("length_grouped", {}), ("tokens", {"batch_tokens": 1600})):
        s = schedule(2000, 1, 8, lengths, epochs=1, batching=mode, **extra)
        fractions[mode] = batching.padding_fraction([p for step in s.steps for m in step for p in m], lengths)
    assert fractions["rows"] > 0.3 and fractions["length_grouped"] < fractions["rows"] / 4 and fractions["tokens"] < fractions["rows"] / 4


def test_token_budget_must_hold_the_longest_row(tmp_path):
    from orchestrator.config import JobConfig, check_job

    raw = {"model": str(tmp_path), "data": {"train": "t.parquet", "max_length": 128, "batching": "tokens"}}
    job = JobConfig.model_validate(raw)
    problems, _ = check_job(job, local_files=False)
    assert any(p.path == "data.batch_tokens" and "set data.batch_tokens" in p.fix for p in problems)
    job = JobConfig.model_validate(apply_overrides(raw, {"data.batch_tokens": 64}))
    problems, _ = check_job(job, local_files=False)
    assert any(p.path == "data.batch_tokens" and ">= 128" in p.fix for p in problems)


# ---- on Ray ------------------------------------------------------------------------------------------


def base_job(world: Path, tmp_path: Path, **sets):
    raw = load_raw(world / "jobs" / "base.yaml")
    raw = apply_overrides(raw, {"output": str(tmp_path / "runs"), "precision": "fp32", **sets})
    job, _ = build_job(raw)
    return job


def run_rows(run_dir: Path) -> dict[int, list[int]]:
    """step -> the rows of every worker's micro batches, from each worker's record (the last attempt's wins)."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in sorted((run_dir / "rows").glob("rank-*.jsonl")):
        rank = int(f.stem.split("-")[1])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[rank] = [i for micro in rec["rows"] for i in micro]
    return {s: [i for r in sorted(ranks) for i in ranks[r]] for s, ranks in out.items()}


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


@pytest.mark.slow
def test_killed_mid_epoch_resume_reproduces_the_run(world, ray_local, tmp_path, monkeypatch):
    """A fault after step 21 (mid-epoch 1: 32 steps an epoch), the last checkpoint at 20: --resume trains
    exactly the rows and losses of the uninterrupted run from step 21 on."""
    from orchestrator import launch

    sets = {"train.epochs": 2, "train.checkpoint_every": 10, "train.eval_every": 10, "train.log_every": 1}
    whole = launch.train(base_job(world, tmp_path / "whole", **sets), progress=False)
    monkeypatch.setenv("RAYFT_FAULT_AT_STEP", "21")
    job = base_job(world, tmp_path / "killed", **sets)
    with pytest.raises(launch.RunFailed, match="fault injected after step 21"):
        launch.train(job, progress=False)
    killed_dir = next(p for p in (tmp_path / "killed" / "runs").iterdir() if not p.name.startswith("."))
    monkeypatch.delenv("RAYFT_FAULT_AT_STEP")
    resumed = launch.train(job, resume=killed_dir, progress=False)

    records = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "start"] == [0, 20]
    expected, got = run_rows(whole.run_dir), run_rows(killed_dir)
    assert got == expected  # every step's rows, the resumed ones included
    per_epoch = Counter(i for s in range(1, 33) for i in expected[s])
    assert len(per_epoch) == 512 and set(per_epoch.values()) == {1}  # each row once in epoch 1
    a, b = losses(whole.run_dir), losses(killed_dir)
    assert a.keys() == b.keys() and max(abs(a[s] - b[s]) for s in a if s > 20) <= 1e-3
    assert resumed.manifest["metrics"]["eval_accuracy"] == whole.manifest["metrics"]["eval_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("local_rows", [0, 2048], ids=["ray-data-tasks", "in-process"])
def test_bad_rows_are_found_by_the_parallel_pass_with_file_and_row(world, ray_local, tmp_path, monkeypatch, local_rows):
    """The same problems, all at once, whether Ray Data tasks check the file (larger than LOCAL_ROWS) or the
    driver's process does (a small file, checked while Ray starts)."""
    from jobs import stream
    from jobs.data import DataError
    from orchestrator import launch

    monkeypatch.setattr(stream, "LOCAL_ROWS", local_rows)
    rows = tinymodels.colour_rows(1100, seed=9)  # three chunks of the row store: three validation tasks
    rows[7]["image"] = b"not an image"
    rows[600]["answer"] = " "
    rows[1099]["image"] = rows[1099]["image"][:40]  # truncated PNG
    path = tinymodels.write_parquet(rows, tmp_path / "bad.parquet")
    job = base_job(world, tmp_path, **{"data.train": str(path)})
    with pytest.raises(DataError) as e:
        launch.train(job, progress=False)
    text = str(e.value)
    assert f"{path} (data.train) row 7: image does not decode" in text
    assert f"{path} (data.train) row 600: empty answer" in text
    assert f"{path} (data.train) row 1099: image does not decode" in text
    assert len(e.value.problems) == 3
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]  # no run directory left


@pytest.mark.slow
def test_an_image_that_goes_bad_after_validation_fails_the_run_naming_it(world, ray_local, tmp_path):
    """The index is cached after the first run; an image file broken afterwards is found as it streams,
    the run fails naming its file and row, and the checkpoint before it stays exportable."""
    from orchestrator import launch

    path = tinymodels.write_jsonl_with_image_files(tinymodels.colour_rows(256, seed=4), tmp_path / "rows.jsonl")
    # encoded as the rows stream (encoded once, the second run would read the tensors written before the change)
    sets = {"data.train": str(path), "data.eval": None, "data.encode_once": "off", "train.epochs": 2, "train.checkpoint_every": 8, "train.eval_every": 8}
    job = base_job(world, tmp_path, **sets)
    first = launch.train(job, progress=False)
    late = run_rows(first.run_dir)[12][0]  # a row of step 12: after the step-8 checkpoint
    (tmp_path / "rows_images" / f"{late}.png").write_bytes(b"garbage")
    with pytest.raises(launch.RunFailed) as e:
        launch.train(job, progress=False)
    assert f"{path} (data.train) row {late}:" in str(e.value) and "did the file change?" in str(e.value)
    broken = max((p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    checkpoint = launch.latest_checkpoint(broken)
    assert checkpoint is not None and json.loads((checkpoint / "metrics.json").read_text())["step"] == 8


@pytest.mark.slow
def test_worker_memory_does_not_grow_with_rows(world, ray_local, tmp_path):
    """Peak RSS of the worker and the driver at 512 and 8192 rows, 20 steps each, rows encoded as they
    stream (the path for data too large to encode once): the old in-memory path held every row's pixels
    (48 KiB a row here: +360 MiB at 8192 rows); the stream holds a window."""
    import resource

    from orchestrator import launch

    peaks = {}
    for n in (512, 8192):
        path = tinymodels.write_parquet(tinymodels.colour_rows(n, seed=n), tmp_path / f"rows{n}.parquet")
        sets = {"data.train": str(path), "data.encode_once": "off", "train.max_steps": 20, "train.eval_every": 20}
        out = launch.train(base_job(world, tmp_path / str(n), **sets), progress=False)
        records = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert next(r for r in records if r.get("event") == "start")["rows"] == n
        peaks[n] = max(r["peak_rss_mib"] for r in records if "peak_rss_mib" in r)
    driver_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peaks[8192] < peaks[512] + 100, peaks
    assert driver_peak_mib < 3000  # the test process: driver of every run in this file


def varied_rows(n: int, seed: int) -> list[dict]:
    """Colour rows whose questions carry 0-40 filler words: lengths from ~25 to ~65 tokens."""
    rng = random.Random(seed)
    rows = tinymodels.colour_rows(n, seed=seed)
    for r in rows:
        r["question"] = " ".join(["the"] * rng.randint(0, 40)) + " " + r["question"]
    return rows


@pytest.mark.slow
def test_length_grouping_and_packing_cut_padding_and_keep_accuracy(world, ray_local, tmp_path):
    from orchestrator import launch

    train = tinymodels.write_parquet(varied_rows(512, 1), tmp_path / "train.parquet")
    evalf = tinymodels.write_parquet(varied_rows(128, 2), tmp_path / "eval.parquet")
    results = {}
    for mode in ("rows", "length_grouped", "packed"):
        sets = {"data.train": str(train), "data.eval": str(evalf), "data.max_length": 96, "data.batching": mode, "precision": "bf16", "train.epochs": 3}
        if mode == "packed":  # one packed sequence of about the tokens of the other modes' 16 rows (~64 tokens each)
            sets["data.batch_tokens"] = 16 * 64
        if mode == "rows":  # its padding only: rows' accuracy at bf16 is test_train's quickstart base (> 90%)
            sets["train.max_steps"] = 8
        out = launch.train(base_job(world, tmp_path / mode, **sets), progress=False)
        records = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
        padding = [r["padding"] for r in records if "padding" in r]
        results[mode] = (sum(padding) / len(padding), out.manifest["metrics"]["eval_accuracy"])
    assert results["rows"][0] > 0.2 and results["length_grouped"][0] < results["rows"][0] / 3, results
    assert results["length_grouped"][1] >= 0.9, results
    assert results["packed"] == (0.0, results["packed"][1]) and results["packed"][1] >= 0.9, results  # no padding at all


def test_stream_matches_in_process_encoding_on_every_architecture(ray_local, tmp_path):
    """Idefics3, Qwen2-VL, PaliGemma and LLaVA: the Ray Data stream's micro batches are the in-process
    encoder's, tensor for tensor (Qwen2-VL's mm_token_type_ids, PaliGemma's token_type_ids, Idefics3's crops)."""
    import torch

    from jobs import stream
    from jobs.data import collate, encode_rows
    from jobs.model import load_processor
    from orchestrator.architectures import for_model_dir

    data = tinymodels.write_parquet(tinymodels.colour_rows(8, seed=5), tmp_path / "rows.parquet")
    builders = tinymodels.TINY_VLMS
    for name, build in builders.items():
        model = build(tmp_path / name)
        job, _ = build_job({"model": str(model), "data": {"train": str(data)}, "method": "full", "train": {"micro_batch_size": 4, "epochs": 1}})
        indexes = stream.index(job, stream.build_stores(job, tmp_path / "cache"))
        plan = stream.plan(job, indexes, 1, 0)
        got = list(stream.micro_batches(plan.datasets["train_0"]))
        processor = load_processor(str(model), for_model_dir(model))
        for _, _, rows, tensors in got:
            examples, _ = encode_rows(data, job.data, processor, True, rows)
            expected = collate(examples, processor.tokenizer.pad_token_id)
            assert tensors.keys() == expected.keys(), name
            for k in expected:
                assert torch.equal(tensors[k], expected[k]), (name, k)
        assert sorted(i for _, _, rows, _ in got for i in rows) == list(range(8))
        assert list(indexes["train"].lengths) == [len(e.input_ids) for e in encode_rows(data, job.data, processor, True)[0]], name


def test_direct_shards_equal_the_ray_data_stream_and_a_cluster_keeps_ray_data(world, ray_local, tmp_path, monkeypatch):
    """Rows encoded once on this machine are read by the workers themselves when every worker runs here (local):
    two ranks' train and eval micro batches, tensor for tensor and in order, are the Ray Data stream's. A cluster's
    plan (local=False), or a file too large for the in-process path, keeps Ray Data: a worker on another node
    cannot read this machine's disk."""
    import torch

    from jobs import stream
    from jobs.encoded import encode_once

    job = base_job(world, tmp_path, **{"train.epochs": 1, "data.batching": "length_grouped"})
    indexes, _ = encode_once(job, stream.index(job, stream.build_stores(job, tmp_path / "cache")))
    assert stream.plan(job, indexes, 2, 0, local=False).direct is None
    direct, streamed = stream.plan(job, indexes, 2, 3, local=True), stream.plan(job, indexes, 2, 3)
    assert direct.direct is not None and not direct.datasets and direct.names == streamed.names == sorted(streamed.datasets)
    for rank in (0, 1):
        shards = stream.direct_shards(direct.direct, rank, "node-a")
        for shard, name in zip(shards, (f"train_{rank}", f"eval_{rank}"), strict=True):
            got, nodes = list(stream.micro_batches(shard, set())), set()
            want = list(stream.micro_batches(streamed.datasets[name], nodes))
            assert [g[:3] for g in got] == [w[:3] for w in want] and got[0][0] == (3 if name.startswith("train") else -1), name
            assert all(g[3].keys() == w[3].keys() and all(torch.equal(g[3][k], w[3][k]) for k in w[3]) for g, w in zip(got, want, strict=True))
    monkeypatch.setattr(stream, "LOCAL_ROWS", 100)  # a file of more rows than the in-process path takes
    assert stream.plan(job, indexes, 2, 0, local=True).direct is None
