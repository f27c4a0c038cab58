"""How `rayft tune` chooses and budgets its trials: grid once per point with distinct seeds for repeats, a
trial-step budget, Optuna's sampler, ASHA's derived milestones and a memory budget, on the quickstart task."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import RAYFT

from orchestrator.config import ConfigError, TuneConfig, build_job, load_search
from orchestrator.search import asha_milestones, optuna_startup


def job_file(quickstart_run: dict, tmp: Path, tune: dict, **train) -> Path:
    root = Path(quickstart_run["root"])
    body = {
        "name": "search", "model": str(root / "base"), "method": "qlora",
        "data": {"train": str(root / "data/french_train.parquet"), "eval": str(root / "data/french_eval.parquet"), "max_length": 64},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "precision": "bf16",
        "train": {"micro_batch_size": 16, "lr": 5e-3, "eval_every": 4, "log_every": 4, **train},
        "scaling": {"workers": 1, "cpus_per_worker": 1}, "output": str(tmp / "runs"), "tune": tune,
    }
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def run_search(path: Path) -> dict:
    proc = subprocess.run([RAYFT, "tune", str(path), "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])


def test_milestones_follow_the_run_length_and_eval_cadence():
    tune = TuneConfig.model_validate({"space": {}})
    m = asha_milestones(tune, eval_every=4, shortest=32, longest=64)
    assert m["grace_period"] == 20  # 5/8 of the shortest run (bench/search_compare.py), on an eval
    assert m["max_t"] == 65  # past the longest run: no trial is stopped at its own last report
    assert asha_milestones(tune, eval_every=6, shortest=32, longest=32)["grace_period"] == 24  # 20 rounded up to an eval
    assert asha_milestones(tune.model_copy(update={"grace_evals": 1}), 4, 32, 32)["grace_period"] == 4  # the override
    assert optuna_startup(4) == 2 and optuna_startup(60) == 10


def test_search_options_are_checked_against_the_space(quickstart_run, tmp_path):
    cases = [
        ({"search": "grid", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}, "search: grid needs listed values"),
        ({"search": "optuna", "space": {"train.lr": {"grid": [1e-4, 1e-2]}}}, "search: optuna does not enumerate grids"),
        ({"num_samples": 4, "space": {"train.lr": {"grid": [1e-4, 1e-2]}}}, "set tune.repeats: 4"),
        ({"repeats": 2, "space": {"train.seed": {"choice": [1, 2]}}}, "also searched"),
        ({"budget": {}, "space": {"train.lr": {"grid": [1e-4]}}}, "give trial_steps, wall or both"),
        ({"budget": {"wall": "soon"}, "space": {"train.lr": {"grid": [1e-4]}}}, "give a duration"),
        ({"memory_budget": "16", "space": {"train.lr": {"grid": [1e-4]}}}, "give a size with a unit"),
    ]
    for tune, expected in cases:
        with pytest.raises(ConfigError) as e:
            load_search(job_file(quickstart_run, tmp_path, tune))
        assert expected in "\n".join(str(p) for p in e.value.problems), (tune, e.value.problems)


def _points_tune_draws(tune: TuneConfig, tmp: Path) -> list[dict]:
    """The configs Ray Tune runs for this tune: section (the same space and search algorithm rayft builds),
    with a trainable that only reports."""
    from ray import tune as rt

    from orchestrator.search import param_space, search_algorithm

    tuner = rt.Tuner(lambda config: {"m": 1.0}, param_space=param_space(tune),
                     tune_config=rt.TuneConfig(metric="m", mode="max", num_samples=tune.samples, search_alg=search_algorithm(tune, 2, tmp, ({}, 8))),
                     run_config=rt.RunConfig(storage_path=str(tmp), name="t", verbose=0))
    keys = [*tune.space, *(["train.seed"] if tune.repeats > 1 else [])]
    return [{k: r.config[k] for k in keys} for r in tuner.fit()]


def test_random_search_over_choices_and_a_grid_draw_each_point_at_most_once(ray_local, tmp_path):
    space = {"lora.rank": {"choice": [4, 16]}, "train.lr": {"choice": [1e-3, 3e-3, 5e-3]}}
    every = _points_tune_draws(TuneConfig.model_validate({"space": space}), tmp_path / "a")
    assert len(every) == 6 and len({tuple(p.values()) for p in every}) == 6  # null num_samples: the 6 points, once each
    some = _points_tune_draws(TuneConfig.model_validate({"space": space, "num_samples": 4, "seed": 1}), tmp_path / "b")
    assert len(some) == 4 and len({tuple(p.values()) for p in some}) == 4
    # a grid: every point once in a shuffled order (not the lists as written), each repeat with its own seed
    grid = _points_tune_draws(TuneConfig.model_validate({"search": "grid", "repeats": 2, "space": space}), tmp_path / "c")
    assert len(grid) == 12 and len({tuple(p.values()) for p in grid}) == 12
    assert {(p["lora.rank"], p["train.lr"]) for p in grid} == {(r, lr) for r in (4, 16) for lr in (1e-3, 3e-3, 5e-3)}
    assert {p["train.seed"] for p in grid} == {0, 1}
    firsts = [(p["lora.rank"], p["train.lr"]) for p in grid[::2]]
    assert firsts != sorted(firsts)


@pytest.mark.slow
def test_a_grid_runs_each_point_once_repeats_get_their_own_seeds_and_a_step_budget_holds(quickstart_run, tmp_path):
    # 2 learning rates x 2 repeats = 4 points of 8 steps; a budget of 24 trial-steps fits three of them
    tune = {"search": "grid", "scheduler": "fifo", "repeats": 2, "max_concurrent": 1, "budget": {"trial_steps": 24},
            "space": {"train.lr": {"grid": [5e-3, 3e-4]}}}
    summary = run_search(job_file(quickstart_run, tmp_path, tune, max_steps=8, seed=7))
    points = [(t["overrides"]["train.lr"], t["overrides"]["train.seed"]) for t in summary["trials"]]
    assert len(points) == len(set(points)) == 3, points  # no point twice; the fourth was not started
    assert {seed for _, seed in points} <= {7, 8} and len({seed for _, seed in points}) == 2  # repeats: train.seed, +1
    budget = summary["budget"]
    assert budget["spent"]["trial_steps"] == summary["trial_steps"] == 24 <= budget["trial_steps"]
    assert budget["not_started"] == 1 and "tune.budget.trial_steps" in budget["ended"]
    manifest = json.loads((Path(summary["best_model"]).parent / "manifest.json").read_text())
    assert manifest["search"]["budget"]["spent"]["trial_steps"] == 24
    results = (Path(summary["best_model"]).parents[1] / "results.md").read_text()
    assert "train.seed" in results


@pytest.mark.slow
def test_optuna_search_under_a_memory_budget_prunes_what_does_not_fit_and_exports(quickstart_run, tmp_path):
    from orchestrator import planner

    probe = job_file(quickstart_run, tmp_path, {"space": {"train.lr": {"choice": [1e-3]}}})
    raw = yaml.safe_load(probe.read_text())
    raw.pop("tune")
    predicted = {}
    for method in ("qlora", "full"):
        job, _ = build_job({**raw, "method": method})
        predicted[method] = planner.plan(job, planner.load_shape(job.model), "cpu").total
    assert predicted["qlora"] < predicted["full"]
    between = (predicted["qlora"] + predicted["full"]) // 2
    tune = {"search": "optuna", "num_samples": 4, "max_concurrent": 1, "scheduler": "fifo", "seed": 3,
            "memory_budget": f"{between}B", "space": {"method": {"choice": ["qlora", "full"]}, "train.lr": {"loguniform": [1e-3, 1e-2]}}}
    summary = run_search(job_file(quickstart_run, tmp_path, tune, max_steps=8))
    assert summary["search"] == "optuna" and len(summary["trials"]) == 4
    for t in summary["trials"]:
        if t["overrides"]["method"] == "full":
            assert t["status"] == "skipped" and "tune.memory_budget" in t["reason"], t
        else:
            assert t["status"] == "finished", t
    assert summary["best"]["overrides"]["method"] == "qlora"
    assert (Path(summary["best_model"]) / "config.json").is_file()
    search_dir = Path(summary["best_model"]).parents[1]
    frontier = (search_dir / "frontier.md").read_text()
    assert (search_dir / "frontier.png").stat().st_size > 0 and "skipped" in frontier and "qlora" in frontier
    # Optuna's study is in Tune's experiment state: the sampler saw the finished trials
    assert any(p.name.startswith("searcher-state") for p in (search_dir / "tuner").iterdir())


@pytest.mark.slow
def test_a_wall_budget_stops_the_search_and_exports_the_best_so_far(quickstart_run, tmp_path):
    # 1,024-step trials against a 30 s wall: either a trial is running at 30 s and is stopped at its next report
    # (a trial checkpoints at every eval: its best checkpoint is exported), or the next trial is predicted to
    # end past 30 s and never starts. (256-step trials, ~45 s each once the workers read their rows directly,
    # could finish at their last report just as the wall was reached: listed as wall-stopped, yet finished.)
    # The stopper acts on reports, so even a trial that starts late reports its first eval, with a checkpoint.
    tune = {"search": "random", "scheduler": "fifo", "max_concurrent": 1, "budget": {"wall": "30s"},
            "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}}
    summary = run_search(job_file(quickstart_run, tmp_path, tune, epochs=32, eval_every=8))
    budget = summary["budget"]
    assert budget["ended"].startswith("tune.budget.wall"), budget
    if budget["wall_stopped"]:
        assert budget["spent"]["wall_s"] >= 30
        stopped = [t for t in summary["trials"] if t["status"] == "stopped early"]
        assert stopped and all(t["reason"] == "tune.budget.wall reached" for t in stopped)
    else:
        assert budget["not_started"] == 1 and "predicted to end at" in budget["ended"]
    assert all(t["status"] in ("finished", "stopped early") for t in summary["trials"])
    assert (Path(summary["best_model"]) / "config.json").is_file()


def test_the_budget_ledger_reserves_releases_and_survives_a_resume(tmp_path):
    from types import SimpleNamespace

    from ray.tune.search import BasicVariantGenerator

    from orchestrator.budget import BudgetedSearch, Ledger, open_ledger

    open_ledger(tmp_path, trial_steps=80, wall_s=None, wall_before_s=0.0)
    search = BudgetedSearch(BasicVariantGenerator(), str(tmp_path), costs={}, default_cost=32)
    queue = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(4)]
    search.inner.next_trial = lambda: queue.pop(0) if queue else None  # the trials Tune's generator would make
    assert search.next_trial().trial_id == "t0" and search.next_trial().trial_id == "t1"  # 32 + 32 reserved of 80
    assert search.next_trial() is None and not search.is_finished()  # t2 (32 more) is held while t0, t1 run
    search.on_trial_result("t0", {"step": 8, "total_steps": 32})
    search.on_trial_complete("t0")  # stopped early at step 8: 24 steps released
    assert search.next_trial().trial_id == "t2"  # 8 spent + 32 reserved (t1) + 32 = 72 <= 80
    assert Ledger.load(tmp_path).reserved_steps() == 64
    # --resume: entries that were running reserve nothing until they report again
    open_ledger(tmp_path, trial_steps=80, wall_s=None, wall_before_s=10.0)
    assert Ledger.load(tmp_path).reserved_steps() == 0
    search.on_trial_result("t1", {"step": 16, "total_steps": 32})
    assert Ledger.load(tmp_path).reserved_steps() == 16 and Ledger.load(tmp_path).spent_steps() == 24
    search.on_trial_complete("t1")
    search.on_trial_complete("t2")
    assert search.next_trial().trial_id == "t3"  # 24 spent + 32 <= 80
    search.on_trial_result("t3", {"step": 32, "total_steps": 32})
    search.on_trial_complete("t3")
    queue.append(SimpleNamespace(trial_id="t4", config={}))
    assert search.next_trial() is None and search.is_finished()  # 56 + 32 > 80 and nothing runs: the search ends
    ledger = Ledger.load(tmp_path)
    assert ledger.not_started == 1 and "tune.budget.trial_steps" in ledger.ended and ledger.wall_before_s == 10.0
    assert Ledger(None, wall_s=5.0, started=0.0).refusal(10, now=6.0).startswith("tune.budget.wall")
