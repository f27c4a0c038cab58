"""The search's report without Ray: legend labels, metrics.png growing with its trials, the Pareto rule,
per-trial memory, and frontier.png / frontier.md written from a search directory made by hand and read
by the real orchestrator.search.summarize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from orchestrator import planner, search, search_report
from orchestrator.config import build_job
from orchestrator.search_report import GiB, MiB, pareto, short_value, status_mark, trial_labels


def make_trial(root: Path, name: str, overrides: dict[str, Any], curve: list[tuple[int, float]], *, total: int = 32,
               status: str = "finished", predicted: int | None = GiB, device: str = "cpu", rss_mib: float = 700.0,
               cuda_mib: float | None = None, metric: str = "eval_accuracy") -> None:
    """One trial directory as a real search leaves it: overrides.json, memory.json, metrics.jsonl (start,
    train records with the memory peaks, evals, and an end when it finished) and a checkpoint per eval;
    skipped.txt or error.txt for those statuses."""
    trial = root / "trials" / name
    trial.mkdir(parents=True)
    (trial / "overrides.json").write_text(json.dumps(overrides))
    (trial / "memory.json").write_text(json.dumps({"device": device, "predicted_bytes": predicted}))
    if status == "skipped":
        (trial / "skipped.txt").write_text(f"predicted {predicted / GiB:.2f} GiB per CPU worker, 2.00 GiB available")
        return
    records: list[dict[str, Any]] = [{"event": "start", "step": 0, "total_steps": total, "attempt": 1}]
    for step, value in curve:
        if step:
            train = {"event": "train", "step": step, "train_loss": 1.0, "peak_rss_mib": rss_mib * (0.9 + 0.1 * step / total)}
            if cuda_mib is not None:
                train["cuda_peak_mib"] = cuda_mib
            records.append(train)
        records.append({"event": "eval", "step": step, metric: value})
        checkpoint = trial / "checkpoints" / f"checkpoint_{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "metrics.json").write_text(json.dumps({"step": step}))
    if status == "finished":
        records.append({"event": "end", "step": total})
    if status == "failed":
        (trial / "error.txt").write_text("RuntimeError: a worker died")
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_search(root: Path, *, metric: str = "eval_accuracy", scheduler: str = "asha") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    job = {"name": "synthetic", "model": "7B", "method": "lora", "data": {"train": "train.jsonl"},
           "tune": {"metric": metric, "scheduler": scheduler, "space": {"lora.rank": {"choice": [4, 16, 64]}}}}
    (root / "tune.yaml").write_text(yaml.safe_dump(job))
    return root


def rising(top: float, steps: int = 32, every: int = 8) -> list[tuple[int, float]]:
    return [(s, round(top * s / steps, 4)) for s in range(0, steps + 1, every)]


def frontier_search(root: Path) -> Path:
    """Ranks 4/16/64 at two learning rates, one trial stopped early, one failed, one skipped."""
    make_search(root)
    make_trial(root, "t_00000", {"lora.rank": 4, "train.lr": 5e-3}, rising(0.6), predicted=int(1.0 * GiB))
    make_trial(root, "t_00001", {"lora.rank": 16, "train.lr": 5e-3}, rising(0.8), predicted=int(1.5 * GiB))
    make_trial(root, "t_00002", {"lora.rank": 64, "train.lr": 5e-3}, rising(0.8), predicted=int(3.0 * GiB))
    make_trial(root, "t_00003", {"lora.rank": 16, "train.lr": 3e-4}, rising(0.1, 8), predicted=int(1.5 * GiB), status="stopped early")
    make_trial(root, "t_00004", {"lora.rank": 64, "train.lr": 3e-4}, rising(0.9, 16), predicted=int(3.0 * GiB), status="failed")
    make_trial(root, "t_00005", {"lora.rank": 256, "train.lr": 5e-3}, [], predicted=int(9.0 * GiB), status="skipped")
    make_trial(root, "t_00006", {"lora.rank": 4, "train.lr": 3e-4}, rising(0.6), predicted=int(1.0 * GiB))
    return root


# ---- labels and metrics.png -----------------------------------------------------------------------------


def test_legend_labels_carry_the_hyperparameters():
    trials = [
        {"trial": "tune_trial_a_00000", "overrides": {"train.lr": 0.005, "lora.rank": 16}},
        {"trial": "tune_trial_a_00001", "overrides": {"train.lr": 0.000736, "lora.rank": 4, "lora.alpha": 32.0}},
        {"trial": "tune_trial_a_00002", "overrides": {"precision": "bf16", "method": "qlora", "quantization.type": "nf4",
                                                      "train.epochs": 2, "train.seed": 7, "data.max_length": 64}},
    ]
    labels = trial_labels(trials)
    assert labels["tune_trial_a_00000"] == "lr=5e-3 r=16"
    assert labels["tune_trial_a_00001"] == "lr=7.36e-4 r=4 alpha=32"
    assert labels["tune_trial_a_00002"] == "precision=bf16 method=qlora quant=nf4 ep=2 seed=7 max_length=64"
    assert [short_value(v) for v in (3e-4, 0.05, 1.5e-4, 1, True, 250000.0)] == ["3e-4", "0.05", "1.5e-4", "1", "true", "2.5e5"]
    # four samples of one grid point: the same hyperparameters, told apart by their trial number
    same = [{"trial": f"tune_trial_b_0000{i}", "overrides": {"train.lr": 5e-3}} for i in range(4)]
    assert list(trial_labels(same).values()) == [f"lr=5e-3 #{i}" for i in range(4)]


def test_status_marks():
    def t(status: str, steps: int = 32) -> dict[str, Any]:
        return {"trial": "x", "status": status, "steps": steps}

    assert status_mark(t("stopped early", 8), None) == "stopped @8"
    assert status_mark(t("skipped"), None) == "skipped"
    assert status_mark(t("failed"), None) == "failed"
    assert status_mark(t("finished"), None) == ""
    assert status_mark(t("finished"), "x") == "best"


def synthetic_summary(n: int) -> dict[str, Any]:
    """n trials in summarize's shape: rising curves, every third stopped early, the last one skipped."""
    trials = []
    for i in range(n):
        stopped = i % 3 == 2
        curve = rising(0.3 + 0.6 * ((i * 7) % n) / n, 16 if stopped else 32)
        skipped = i == n - 1 and n > 1
        trials.append({"trial": f"tune_trial_c_{i:05d}", "overrides": {"train.lr": 1e-4 * (i + 1), "lora.rank": 4 * (1 + i % 3)},
                       "status": "skipped" if skipped else ("stopped early" if stopped else "finished"), "reason": None,
                       "steps": 0 if skipped else curve[-1][0], "total_steps": 32, "best_metric": None if skipped else curve[-1][1],
                       "best_step": None if skipped else curve[-1][0], "curve": [] if skipped else curve,
                       "segments": [] if skipped else [curve], "memory": {"device": "cpu", "predicted_bytes": GiB * (1 + i % 3)}})
    best = max((t for t in trials if t["best_metric"] is not None), key=lambda t: t["best_metric"])
    return {"metric": "eval_accuracy", "mode": "max", "scheduler": "asha", "trials": trials, "best": best, "trial_steps": 0}


def test_metrics_png_grows_with_the_trials_and_caps_its_legend(tmp_path):
    sizes = {}
    for n in (4, 30, 40, 60):
        path = tmp_path / f"metrics-{n}.png"
        sizes[n] = search_report.plot(synthetic_summary(n), path)
        with Image.open(path) as img:
            assert img.size == sizes[n] and img.format == "PNG"
    assert sizes[4][1] < sizes[30][1] < sizes[40][1]
    # past 40 trials the legend lists the best 20 and says how many more: shorter than 40 rows
    assert sizes[60][1] < sizes[40][1]


def test_identical_curves_are_drawn_apart():
    fraction = search_report.offset_fraction(4)
    shifted = search_report.shifts(["a", "b", "c", "d"], "c", fraction)
    assert shifted["c"] == 0.0 and len(set(shifted.values())) == 4
    assert max(abs(v) for v in shifted.values()) <= 0.02 + 1e-12
    assert search_report.offset_fraction(1) == 0.0
    assert search_report.offset_fraction(41) * 40 <= 0.04 + 1e-12


def test_ticks_are_round_and_four_to_eight():
    for lo, hi in ((0, 32), (0, 12), (0, 21), (0, 100), (0, 7), (0, 1000), (0, 48)):
        found = search_report.ticks(lo, hi, inside=True, integer=True)
        assert 4 <= len(found) <= 8 and all(float(v).is_integer() for v in found) and lo <= found[0] and found[-1] <= hi, (lo, hi, found)
    for lo, hi in ((0.0, 0.8125), (0.31, 0.33), (1.01, 1.01), (0.0, 0.0)):
        found = search_report.ticks(lo, hi)
        assert 4 <= len(found) <= 8 and found[0] <= lo and found[-1] >= hi, (lo, hi, found)


# ---- the Pareto rule ------------------------------------------------------------------------------------


def point(name: str, gib: float | None, metric: float | None, status: str = "finished") -> dict[str, Any]:
    return {"trial": name, "best_metric": metric, "status": status,
            "memory": {"predicted_bytes": None if gib is None else int(gib * GiB)}}


def test_pareto_keeps_the_trials_no_other_beats_on_both():
    trials = [
        point("small", 1.0, 0.60),
        point("small_worse", 1.0, 0.50),  # same memory, lower metric: dominated
        point("mid", 1.5, 0.80),
        point("mid_twin", 1.5, 0.80),  # equal on both: neither dominates the other
        point("big_same", 3.0, 0.80),  # more memory, no better: dominated
        point("big_better", 3.0, 0.85),
        point("bigger_worse", 4.0, 0.70),  # dominated by mid
        point("failed", 0.5, 0.99, "failed"),
        point("skipped", 0.2, None, "skipped"),
        point("no_prediction", None, 0.99),
        point("no_metric", 0.1, None, "stopped early"),
    ]
    assert pareto(trials, "max") == ["small", "mid", "mid_twin", "big_better"]
    # eval_loss: lower is better
    losses = [point("a", 1.0, 2.0), point("b", 2.0, 1.0), point("c", 2.0, 1.5), point("d", 3.0, 1.0)]
    assert pareto(losses, "min") == ["a", "b"]
    assert pareto([], "max") == []


# ---- per-trial memory -----------------------------------------------------------------------------------


def test_trial_memory_reads_the_prediction_and_the_measured_peak(tmp_path):
    make_trial(tmp_path, "cpu", {}, rising(0.5), predicted=GiB, rss_mib=700.0)
    make_trial(tmp_path, "gpu", {}, rising(0.5), predicted=2 * GiB, device="gpu", rss_mib=3000.0, cuda_mib=1500.0)
    cpu = search_report.trial_memory(tmp_path / "trials" / "cpu")
    assert cpu == {"device": "cpu", "predicted_bytes": GiB, "measured_bytes": int(700.0 * MiB), "measured_kind": "host_rss"}
    gpu = search_report.trial_memory(tmp_path / "trials" / "gpu")
    assert gpu["measured_kind"] == "cuda_peak" and gpu["measured_bytes"] == int(1500.0 * MiB) and gpu["predicted_bytes"] == 2 * GiB
    bare = tmp_path / "trials" / "bare"
    bare.mkdir()
    assert search_report.trial_memory(bare) == {"device": None, "predicted_bytes": None, "measured_bytes": None, "measured_kind": None}


def test_write_trial_memory_asks_the_planner(tmp_path):
    job, _ = build_job({"model": "7B", "data": {"train": "(none).jsonl"}, "method": "qlora"}, local_files=False)
    written = search_report.write_trial_memory(job, tmp_path, planner.Budget("gpu", 24 * GiB, "test", per_worker=True))
    expected = planner.plan(job, planner.load_shape("7B"), "gpu").total
    assert written == {"device": "gpu", "predicted_bytes": expected} == json.loads((tmp_path / "memory.json").read_text())
    assert expected > 3 * GiB
    unreadable, _ = build_job({"model": str(tmp_path / "no-such-model"), "data": {"train": "(none).jsonl"}}, local_files=False)
    failed = search_report.write_trial_memory(unreadable, tmp_path, planner.Budget("cpu", None, "test"))
    assert failed["predicted_bytes"] is None and "no-such-model" in failed["predicted_error"]


# ---- the whole report from a search directory ------------------------------------------------------------


def test_write_report_writes_the_frontier(tmp_path):
    root = frontier_search(tmp_path / "search")
    summary = search.summarize(root)
    assert {t["trial"]: t["memory"]["predicted_bytes"] for t in summary["trials"]}["t_00002"] == 3 * GiB
    report = search_report.write_report(root, summary)
    for name in ("results.csv", "results.md", "metrics.png", "frontier.png", "frontier.md"):
        assert (root / name).stat().st_size > 0
    assert report.files["frontier"] == root / "frontier.png" and report.frontier_md == (root / "frontier.md").read_text()
    assert "| predicted GiB |" in report.results_md and "| 3.000 |" in report.results_md
    rows = {line.split(" | ")[0].strip("| ").removesuffix(" (best)"): line for line in report.frontier_md.splitlines() if line.startswith("| t_")}
    # Pareto: rank 4 (0.6 at 1 GiB, twice) and rank 16 (0.8 at 1.5 GiB); rank 64 is no better for twice the
    # memory, the failed trial and the skipped one are not candidates
    assert {name for name, line in rows.items() if line.endswith("| yes |")} == {"t_00000", "t_00006", "t_00001"}
    assert "| r=16 lr=5e-3 | lora | finished | 0.8000 | 1.500 |" in rows["t_00001"] and "(host_rss)" in rows["t_00001"]
    assert "| skipped |" in rows["t_00005"] and "| 9.000 |" in rows["t_00005"]
    assert "stopped early @8" in rows["t_00003"]
    order = [float(line.split(" | ")[5]) for line in rows.values()]
    assert order == sorted(order)  # by predicted memory
    assert "Memory budget: none set" in report.frontier_md
    assert "Pareto frontier, by predicted memory: r=4 lr=5e-3 (0.6000 at 1.000 GiB)" in report.frontier_md


def test_the_memory_budget_comes_from_tune_yaml(tmp_path):
    root = frontier_search(tmp_path / "search")
    summary = search.summarize(root)
    job = yaml.safe_load((root / "tune.yaml").read_text())
    job["tune"]["memory_budget"] = "2GiB"  # the schema's coming key; the report reads it from the file
    (root / "tune.yaml").write_text(yaml.safe_dump(job))
    report = search_report.write_report(root, summary)
    assert "Memory budget: 2.000 GiB per CPU worker (tune.memory_budget)" in report.frontier_md
    assert search_report.memory_budget({"tune": {"memory_budget": 3 * GiB}}) == 3 * GiB
    assert search_report.memory_budget({"tune": {"memory_budget": "not a size"}}) is None
    assert search_report.memory_budget({}) is None
    with Image.open(root / "frontier.png") as img:
        assert img.format == "PNG" and img.width >= 1000


def test_a_trial_in_a_reused_actor_measures_its_own_peak_memory():
    """Tune reuses a trial's actor for the next trial (jobs/tune_worker.py): each trial's measured peak (the memory
    frontier's) is its own, not the largest of the trials the actor trained before it."""
    import torch

    from jobs.train_loop import peak_memory, reset_peaks

    cpu = torch.device("cpu")
    earlier_trial = torch.ones(400 * 2**20 // 4)  # 400 MiB held by the trial before
    held = peak_memory(cpu)["peak_rss_mib"]
    del earlier_trial
    reset_peaks(cpu)
    assert peak_memory(cpu)["peak_rss_mib"] < held - 300
