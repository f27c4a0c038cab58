"""`rayft tune`: the job's `tune:` space -> Ray Tune (ASHA or FIFO) over Ray Train trials -> the best
trial's best checkpoint merged and exported to SEARCH_DIR/best, with a table and a plot of every trial.

A search directory:
    tune.yaml            the resolved job (with its tune: section)
    tuner/               Ray Tune's experiment state (what --resume restores)
    trials/<trial>/      one run directory per trial (job.yaml, overrides.json, metrics.jsonl, checkpoints/)
    results.csv / .md    one row per trial: overrides, status (finished / stopped early / failed / skipped, with the
                         reason), best metric, steps, wall time
    metrics.png          every trial's eval metric over steps, labelled with its hyperparameters; early-stopped
                         trials dashed, the winner thick
    frontier.png / .md   best metric against predicted memory per worker, Pareto points marked (search_report/)
    asha.json            ASHA's milestones (grace_period, max_t in optimizer steps; reduction_factor)
    budget.json          tune.budget's ledger: steps reserved and spent per trial, wall time, why the search ended
    best/                model/ (merged standalone) + manifest.json listing every trial
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import IO, Any

from jobs.checkpoint import kept_checkpoints
from jobs.metrics_log import metrics_path, read_metrics
from orchestrator import planner
from orchestrator.config import (
    JobConfig,
    TuneConfig,
    apply_overrides,
    build_job,
    load_raw,
    parse_size,
    to_yaml,
)
from orchestrator.launch import (
    Capacity,
    Interrupted,
    RunFailed,
    ensure_local_ray,
    export_run,
    output_to,
    resources_for,
    shutdown_ray,
)
from orchestrator.rundir import new_dir
from orchestrator.search_report import Report, trial_memory, write_report
from orchestrator.trial import SKIPPED

TUNER_DIR = "tuner"
TUNE_STATUS = "tune_status.json"  # trial directory name under tuner/ -> "ok" | "error", as Tune saw it


def param_space(tune: TuneConfig, train_seed: int = 0) -> dict[str, Any]:
    """Ray Tune's space: search: grid enumerates choice values too; tune.repeats adds train.seed as a grid
    of its own (train.seed, +1, ...), so each repeat of a point trains from its own seed."""
    from ray import tune as rt

    space = {}
    for key, dim in tune.space.items():
        if tune.search == "grid":  # the points themselves come from distinct_points, in a shuffled order
            space[key] = rt.choice(dim.choice or dim.grid or [])
        elif dim.choice is not None:
            space[key] = rt.choice(dim.choice)
        elif dim.grid is not None:
            space[key] = rt.grid_search(dim.grid)
        elif dim.uniform is not None:
            space[key] = rt.uniform(*dim.uniform)
        else:
            assert dim.loguniform is not None
            space[key] = rt.loguniform(*dim.loguniform)
    if tune.repeats > 1:
        space["train.seed"] = rt.grid_search([train_seed + k for k in range(tune.repeats)])
    return space


def trial_lengths(job: JobConfig, base: dict[str, Any], indexes: dict[str, Any]) -> tuple[dict[str, int], int]:
    """Optimizer steps a trial runs: (by the values of the searched keys that change it, the base job's),
    from the same schedule the trial builds over the validated rows."""
    from jobs.batching import build_schedule
    from orchestrator.budget import LENGTH_KEYS, length_key

    tune = job.tune
    assert tune is not None
    train = indexes["train"]

    def steps(j: JobConfig) -> int:
        return len(build_schedule(train.rows, train.lengths, j.train, j.data, j.scaling.workers).steps)

    costs = {}
    if any(k in LENGTH_KEYS for k in tune.space):
        for corner in space_corners(tune):
            point = {k: v for k, v in corner.items() if k in LENGTH_KEYS}
            if length_key(point) not in costs:
                costs[length_key(point)] = steps(build_job(apply_overrides(base, point))[0])
    return costs, steps(job)


def asha_milestones(tune: TuneConfig, eval_every: int, shortest: int, longest: int) -> dict[str, int]:
    """ASHA's grace period (the first milestone, in optimizer steps) and max_t: grace_evals evals, or
    grace_share of the shortest trial's steps rounded up to an eval. max_t lies past the longest trial, so
    no trial is stopped at its own last report."""
    if tune.grace_evals is not None:
        grace = tune.grace_evals * eval_every
    else:
        grace = max(1, math.ceil(tune.grace_share * shortest / eval_every)) * eval_every
    return {"grace_period": grace, "max_t": longest + 1}


def search_algorithm(tune: TuneConfig, max_concurrent: int, search_dir: Path, lengths: tuple[dict[str, int], int]) -> Any:
    """random and grid: Tune's BasicVariantGenerator (seeded); optuna: OptunaSearch with a seeded TPE sampler
    under Tune's ConcurrencyLimiter; with tune.budget, wrapped so trials start only while it allows."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

    if tune.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=optuna_startup(tune.samples))
        alg = SearchGenerator(ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=max_concurrent))
    else:
        # the limit goes to the generator: Tune ignores max_concurrent_trials when given a search-algorithm
        # instance, and would start every trial at once
        alg = BasicVariantGenerator(random_state=tune.seed, max_concurrent=max_concurrent, points_to_evaluate=distinct_points(tune))
    if tune.budget is None:
        return alg
    from orchestrator.budget import BudgetedSearch

    return BudgetedSearch(alg, str(search_dir), *lengths)


def distinct_points(tune: TuneConfig) -> list[dict[str, Any]] | None:
    """search: grid, and a random search over choice keys only: the points in a random order (tune.seed),
    each once; a random search samples with replacement after them. In Tune's own grid order (the first key
    slowest, each list as written) a grid ascending in lr met ASHA's milestones worst-first: 0.94x FIFO's
    trial-steps (bench/results/search_confirm.json), against 0.77x on average over shuffled orders; and 6
    random draws of a 12-point space held 4.6 distinct points (bench/search_compare.py)."""
    import random

    if tune.discrete_points() is None:
        return None
    points = space_corners(tune)  # listed values only here, so the corners are every point
    random.Random(tune.seed).shuffle(points)
    return points if tune.samples < 0 else points[: tune.samples]  # Tune counts each point as one of num_samples


def optuna_startup(samples: int) -> int:
    """TPE's random trials before it models the finished ones: a third of the budget, 2 to 10 (Optuna's
    default of 10 would make a search of 10 trials or fewer purely random)."""
    return 10 if samples < 0 else min(10, max(2, samples // 3))


def concurrency(job: JobConfig, capacity: Capacity) -> int:
    """Trials that fit at once in the Ray cluster's capacity: each needs `workers` x (cpus_per_worker CPUs
    [+ 1 GPU]); on GPUs one trial per `scaling.workers` GPUs."""
    tune = job.tune
    assert tune is not None
    if tune.max_concurrent:
        return tune.max_concurrent
    res = resources_for(job, capacity)
    fit = capacity.cpus // (res.cpus_per_worker * job.scaling.workers)
    if res.use_gpu:
        fit = min(fit, capacity.gpus // job.scaling.workers)
    return max(1, fit)


def trial_settings(job: JobConfig, capacity: Capacity) -> dict[str, Any]:
    """What every trial adds to the base job (applied by the same function as --set): a checkpoint at every
    eval, so the best report always has a checkpoint to export, and the CPUs per worker resolved here, once."""
    return {"train.checkpoint_every": job.train.eval_every, "scaling.cpus_per_worker": resources_for(job, capacity).cpus_per_worker}


def space_corners(tune: TuneConfig) -> list[dict[str, Any]]:
    """Every combination of the values each dimension can take (choice and grid values, both bounds of a
    range): what the fit check looks at before a search starts."""
    keys = list(tune.space)
    values = [tune.space[k].values_to_check() for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def fit_budget(job: JobConfig, base: dict[str, Any], memory_limit: int | None, *, check_space: bool, source: str = "--memory-limit") -> planner.Budget:
    """The memory each trial's workers may use (host memory is shared by the trials that run at once).
    check_space: refuse the search (DoesNotFit) when no combination of the space is predicted to fit;
    the trials that do not fit are skipped one by one when they come up (`orchestrator.trial.trial_fits`)."""
    tune = job.tune
    assert tune is not None
    # before Ray starts: the search's embedded Ray runs on this machine
    budget = planner.budget_for(job, memory_limit, concurrent=concurrency(job, Capacity.this_machine()), source=source)
    if check_space:
        verdicts = [planner.check(build_job(apply_overrides(base, corner))[0], budget) for corner in space_corners(tune)]
        if verdicts and not any(v.fits for v in verdicts):
            raise planner.DoesNotFit(f"no trial of the search is predicted to fit; e.g. {verdicts[0].message}")
    return budget


def run(
    job: JobConfig,
    base: dict[str, Any],
    *,
    search_dir: Path | None = None,
    resume: Path | None = None,
    stream: IO[str],
    fit_check: bool = True,
    memory_limit: int | None = None,
    job_file: str | None = None,
) -> dict[str, Any]:
    """fit_check: refuse a search none of whose trials is predicted to fit (planner.DoesNotFit), and skip
    the trials predicted not to fit; memory_limit: bytes per worker to check against (default: detected).
    Ctrl-C and SIGTERM stop the search (Tune saves it) and raise Interrupted with the resume command, which
    names job_file, as launch.train does for a run."""
    from orchestrator.signals import sigterm_as_sigint, stopped_by

    with sigterm_as_sigint() as got:
        try:
            return _run(job, base, search_dir, resume, stream, fit_check, memory_limit)
        except (KeyboardInterrupt, Interrupted) as e:
            signum = got.get("signal", signal.SIGINT)
            directory = getattr(e, "directory", None)
            raise Interrupted(f"stopped by {stopped_by(signum)}; continue with: rayft tune {job_file or 'JOB'} --resume {directory or 'SEARCH_DIR'}",
                              128 + signum, directory) from None


def _run(
    job: JobConfig,
    base: dict[str, Any],
    search_dir: Path | None,
    resume: Path | None,
    stream: IO[str],
    fit_check: bool,
    memory_limit: int | None,
) -> dict[str, Any]:
    from ray import tune as rt

    from jobs.failure_recorder import TrialFailures
    from orchestrator.trial import in_trial_actor, trial_resources, tune_trial

    tune = job.tune
    assert tune is not None
    if memory_limit is None and tune.memory_budget is not None:
        memory_limit = parse_size(tune.memory_budget)
        limit_source = "tune.memory_budget"
    else:
        limit_source = "--memory-limit"
    budget = fit_budget(job, base, memory_limit, check_space=not resume, source=limit_source) if fit_check else None
    if resume:
        search_dir = resume.resolve()
    elif search_dir is not None:
        search_dir = search_dir.resolve()
        search_dir.mkdir(parents=True, exist_ok=False)
    else:
        search_dir = new_dir(Path(job.output), f"{job.name}-search")
    if not resume:
        (search_dir / "tune.yaml").write_text(to_yaml(job))
        (search_dir / "base.json").write_text(json.dumps(base))
    mode = tune.resolved_mode
    cores = os.cpu_count() or 1
    print(f"search directory: {search_dir}", file=stream, flush=True)
    t0 = time.time()
    from jobs import attempts

    attempts.record_invocation(search_dir, t0)
    started = False
    with output_to(search_dir / "ray.log", stream) as user_stream:
        from jobs.tracking import Tracker

        # one parent MLflow run for the search (a --resume continues it); each trial logs a child run under it
        parent = Tracker(job, search_dir, user_stream, kinds=("mlflow",), tags={"rayft.kind": "search"},
                         params={f"tune.{k}": json.dumps(v) for k, v in job.tune.model_dump(mode="json").items()}).start(wait=True)
        try:
            started = ensure_local_ray(cores, dashboard=True)
            capacity = Capacity.from_ray(embedded=True)  # its extra logical CPUs are Ray Data's, not the trials'
            base = apply_overrides(base, trial_settings(job, capacity))
            resources = resources_for(job, capacity)
            # Every row checked, and encoded where the disk allows, once for the whole search (beside the row
            # stores); trials read both back, and a trial that changes the model or columns makes its own.
            from jobs.driver import DATA_CACHE
            from jobs.encoded import encode_once
            from jobs.preflight import checked_stores
            from jobs.stream import index

            indexes, said = encode_once(job, index(job, checked_stores(job, search_dir / DATA_CACHE)))
            for which, text in said.items():
                print(f"data.{which}: {text}", file=user_stream, flush=True)
            lengths = trial_lengths(job, base, indexes)
            if tune.budget is not None:
                from orchestrator.budget import open_ledger

                earlier = _earlier_invocations(search_dir)
                open_ledger(search_dir, tune.budget.trial_steps, tune.budget.wall_s, sum(i["wall_s"] for i in earlier))
            in_actor = in_trial_actor(job, capacity.one_machine)
            trainable = rt.with_resources(
                rt.with_parameters(
                    tune_trial,
                    base=base,
                    search_dir=str(search_dir),
                    resources=resources,
                    keep_best=f"{tune.metric}:{mode}",
                    budget=budget,
                    max_failures=tune.max_failures,
                    tracking_parent=parent.mlflow_run_id,
                    local=capacity.one_machine,
                    in_actor=in_actor,
                ),
                trial_resources(resources, in_actor),
            )
            if resume:
                tuner = rt.Tuner.restore(str(search_dir / TUNER_DIR), trainable=trainable, resume_unfinished=True, resume_errored=False)
            else:
                scheduler = None
                if tune.scheduler == "asha":
                    from ray.tune.schedulers import ASHAScheduler

                    steps = [*lengths[0].values(), lengths[1]]
                    milestones = asha_milestones(tune, job.train.eval_every, min(steps), max(steps))
                    (search_dir / "asha.json").write_text(json.dumps({**milestones, "reduction_factor": tune.reduction_factor}))
                    # every report carries the optimizer step; a trial goes on at a milestone unless its metric is
                    # below the (1 - 1/reduction_factor) quantile of those recorded there before it (ties go on)
                    scheduler = ASHAScheduler(time_attr="step", reduction_factor=tune.reduction_factor, **milestones)
                stopper = None
                if tune.budget is not None:
                    from orchestrator.budget import BudgetStopper

                    stopper = BudgetStopper(str(search_dir))
                tuner = rt.Tuner(
                    trainable,
                    param_space=param_space(tune, job.train.seed),
                    tune_config=rt.TuneConfig(
                        metric=tune.metric,
                        mode=mode,
                        num_samples=tune.samples,
                        scheduler=scheduler,
                        search_alg=search_algorithm(tune, concurrency(job, capacity), search_dir, lengths),
                        # a trial trained in its actor leaves torch, transformers and peft imported there: the next
                        # trial takes the same actor instead of a fresh process importing them again (~5 s)
                        reuse_actors=in_actor,
                    ),
                    run_config=rt.RunConfig(
                        name=TUNER_DIR,
                        storage_path=str(search_dir),
                        verbose=0,
                        stop=stopper,
                        # a trial in its own actor is restarted by Tune; a TorchTrainer's by Ray Train (tune_trial)
                        failure_config=rt.FailureConfig(max_failures=tune.max_failures if in_actor else 0),
                        callbacks=[TrialFailures(str(search_dir))] if in_actor else None,
                    ),
                )
            # A trial skipped before launch (predicted not to fit) ends without a report. Tune's strict check
            # then fails the whole search once the space has 2+ keys (the config keys count as metrics); the
            # trials that run report the metric at every report anyway. Optuna records a skipped trial as pruned.
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
            grid = _fit(tuner)
            # Tune's own verdict: an ASHA-stopped trial's fit() may also raise (its workers are torn down),
            # so error.txt alone cannot tell a failure from an early stop.
            verdicts = {Path(r.path).name: ("error" if r.error else "ok") for r in grid}
            (search_dir / TUNE_STATUS).write_text(json.dumps(verdicts, indent=2))
        except KeyboardInterrupt:
            started = True
            attempts.record_invocation(search_dir, t0, "interrupted")
            parent.finish("killed")
            raise Interrupted("search interrupted", directory=search_dir) from None
        except BaseException:
            parent.finish("failed")
            raise
        finally:
            if started:
                shutdown_ray()
    parent.stream = stream  # the user's stream from output_to is closed now
    summary = summarize(search_dir)
    # every invocation of the search (an interrupted one and its --resume), each also on its own
    earlier = _earlier_invocations(search_dir)
    summary["invocations"] = [*earlier, {"started": t0, "wall_s": round(time.time() - t0, 1), "outcome": "this invocation"}]
    summary["wall_s"] = round(sum(i["wall_s"] for i in summary["invocations"]), 1)
    attempts.record_invocation(search_dir, t0, "completed")
    best = summary["best"]
    if best is None:
        parent.finish("failed")
        why = f" ({summary['budget']['ended']}: raise tune.budget)" if summary.get("budget", {}).get("ended") else ""
        raise RunFailed(f"no trial reported {tune.metric} with a checkpoint{why}; see {search_dir / 'results.md'}")
    trial_dir = search_dir / "trials" / best["trial"]
    trial, _ = build_job(load_raw(trial_dir / "job.yaml"))
    with output_to(search_dir / "export.log"):
        outcome = export_run(trial, trial_dir, Path(best["checkpoint"]), {"search": summary}, parent=search_dir / "best")
    summary["best_model"] = str(outcome.model_dir)
    summary["search_dir"] = str(search_dir)
    summary["best_manifest"] = outcome.manifest
    write_report(search_dir, summary)
    from jobs.tracking import finish_search

    files = [search_dir / n for n in ("tune.yaml", "results.csv", "results.md", "metrics.png", "frontier.png", "frontier.md")] + [search_dir / "best" / "manifest.json"]
    finish_search(search_dir, summary, parent, files, outcome.model_dir, stream)
    return summary


def _earlier_invocations(search_dir: Path) -> list[dict[str, Any]]:
    """The search's invocations before this one (an interrupted one, before its --resume), from every trial's records."""
    from jobs import attempts

    return attempts.invocations(search_dir, [r for trial in (search_dir / "trials").glob("*") for r in read_metrics(trial)])[:-1]


def _fit(tuner: Any) -> Any:
    """tuner.fit(), raising KeyboardInterrupt if Ctrl-C (or SIGTERM, which `rayft tune` turns into one)
    ended it: Tune's own handler then returns from fit() with trials unfinished. Tune saves the SIGINT
    handler it finds and puts it back when a signal comes, and only then, so a marker installed before
    fit() and in place again after it means Tune was interrupted."""

    def marker(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return tuner.fit()
    previous = signal.signal(signal.SIGINT, marker)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return grid


def summarize(search_dir: Path) -> dict[str, Any]:
    """Every trial from its own run directory: overrides, status, best eval, steps, wall time."""
    tune = JobConfig.model_validate(load_raw(search_dir / "tune.yaml")).tune
    assert tune is not None
    mode = tune.resolved_mode
    better = max if mode == "max" else min
    verdicts = json.loads((search_dir / TUNE_STATUS).read_text()) if (search_dir / TUNE_STATUS).is_file() else None
    spend = _budget(search_dir)
    wall_stopped = spend["wall_stopped"] if spend else []
    trials = []
    for trial_dir in sorted((search_dir / "trials").glob("*")):
        records = read_metrics(trial_dir)
        start = next((r for r in records if r.get("event") == "start"), None)
        evals = [r for r in records if r.get("event") == "eval" and tune.metric in r]
        reached = max((r["step"] for r in records if "step" in r), default=0)
        total = start["total_steps"] if start else None
        error = (trial_dir / "error.txt").read_text().strip() if (trial_dir / "error.txt").is_file() else None
        if verdicts is not None:
            errored = any(v == "error" for k, v in verdicts.items() if k.startswith(trial_dir.name + "_"))
            error = error if errored else None
        skipped = (trial_dir / SKIPPED).read_text().strip() if (trial_dir / SKIPPED).is_file() else None
        if skipped:
            status, error = "skipped", "; ".join(line.strip() for line in skipped.splitlines())
        elif any(r.get("event") == "end" for r in records):
            status = "finished"
        elif error:
            status = "failed"
        elif start and reached < total:
            status = "stopped early"
            if any(trial_dir.name.endswith("_" + tid) for tid in wall_stopped):
                error = "tune.budget.wall reached"
        else:  # every step ran; the end record is missing when Tune stopped the trial at its last report
            status = "failed" if not start else "finished"
        checkpoints = kept_checkpoints(trial_dir)
        scored = [r for r in evals if r["step"] in checkpoints]
        best_eval = better(scored, key=lambda r: r[tune.metric]) if scored else None
        trials.append(
            {
                "trial": trial_dir.name,
                "overrides": json.loads((trial_dir / "overrides.json").read_text()) if (trial_dir / "overrides.json").is_file() else {},
                "status": status,
                "reason": error,
                "steps": reached,
                "total_steps": total,
                "best_metric": best_eval[tune.metric] if best_eval else None,
                "best_step": best_eval["step"] if best_eval else None,
                "checkpoint": checkpoints.get(best_eval["step"]) if best_eval else None,
                "curve": [(r["step"], r[tune.metric]) for r in evals],
                "segments": _segments(records, tune.metric),
                "wall_s": _wall(trial_dir),
                "memory": trial_memory(trial_dir, records),
            }
        )
    candidates = [t for t in trials if t["best_metric"] is not None and t["status"] != "failed"]
    best = better(candidates, key=lambda t: t["best_metric"]) if candidates else None
    out = {"metric": tune.metric, "mode": mode, "search": tune.search, "scheduler": tune.scheduler, "trials": trials, "best": best,
           "trial_steps": sum(t["steps"] for t in trials)}
    if (search_dir / "asha.json").is_file() and tune.scheduler == "asha":
        out["asha"] = json.loads((search_dir / "asha.json").read_text())
    if spend is not None:
        out["budget"] = spend
    if tune.memory_budget is not None:
        out["memory_budget"] = tune.memory_budget
    return out


def budget_line(b: dict[str, Any]) -> str:
    """What a budgeted search spent, in one line."""
    parts = []
    if b["trial_steps"] is not None:
        parts.append(f"{b['spent']['trial_steps']} of {b['trial_steps']} trial-steps")
    if b["wall_s"] is not None:
        parts.append(f"{b['spent']['wall_s']:.0f} of {b['wall_s']:.0f} s")
    tail = f"; {b['not_started']} trial not started: {b['ended']}" if b["not_started"] else (f"; {b['ended']}" if b["ended"] else "")
    return "budget: " + ", ".join(parts) + tail


def _budget(search_dir: Path) -> dict[str, Any] | None:
    path = search_dir / "budget.json"  # orchestrator.budget.LEDGER (not imported here: that module imports Ray Tune)
    if not path.is_file():
        return None
    led = json.loads(path.read_text())
    spent = sum(t["reached"] for t in led["trials"].values())
    return {"trial_steps": led["trial_steps"], "wall_s": led["wall_s"], "spent": {"trial_steps": spent, "wall_s": led["wall_spent_s"]},
            "not_started": led["not_started"], "ended": led["ended"], "wall_stopped": led["wall_stopped"]}


def _segments(records: list[dict[str, Any]], metric: str) -> list[list[tuple[int, float]]]:
    """The eval curve split per attempt (a restarted trial runs some steps again)."""
    from orchestrator.run_report import split_by_attempt

    out = []
    for rs in split_by_attempt(records).values():
        points = [(r["step"], r[metric]) for r in rs if r.get("event") == "eval" and metric in r]
        if points:
            out.append(points)
    return out


def _wall(trial_dir: Path) -> float | None:
    files = [p for p in (metrics_path(trial_dir), trial_dir / "job.yaml") if p.is_file()]
    if len(files) < 2:
        return None
    return round(files[0].stat().st_mtime - files[1].stat().st_mtime, 1)


def report(search_dir: Path) -> Report:
    summary = summarize(search_dir)
    return write_report(search_dir, summary)

