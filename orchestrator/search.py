"""`rayft tune`: the job's `tune:` space -> Ray Tune (ASHA or FIFO) over Ray Train trials -> the best
trial's best checkpoint merged and exported to SEARCH_DIR/best, with a table and a plot of every trial.

A search directory:
    tune.yaml            the resolved job (with its tune: section)
    tuner/               Ray Tune's experiment state (what --resume restores)
    trials/<trial>/      one run directory per trial (job.yaml, overrides.json, metrics.jsonl, checkpoints/)
    results.csv / .md    one row per trial: overrides, status (finished / stopped early / failed / skipped, with the
                         reason), best metric, steps, wall time
    metrics.png          every trial's eval metric over steps; early-stopped trials dashed, the winner thick
    best/                model/ (merged standalone) + manifest.json listing every trial
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import IO, Any

from orchestrator import planner
from orchestrator.config import JobConfig, TuneConfig, apply_overrides, build_job, load_raw, to_yaml
from orchestrator.launch import (
    Interrupted,
    RunFailed,
    data_cpus,
    ensure_local_ray,
    export_run,
    output_to,
    read_metrics,
    resources_for,
    shutdown_ray,
)
from orchestrator.search_report import Report, trial_memory, write_report

TUNER_DIR = "tuner"
TUNE_STATUS = "tune_status.json"  # trial directory name under tuner/ -> "ok" | "error", as Tune saw it
SKIPPED = "skipped.txt"  # in a trial directory: the trial was predicted not to fit, and why


def param_space(tune: TuneConfig) -> dict[str, Any]:
    from ray import tune as rt

    space = {}
    for key, dim in tune.space.items():
        if dim.choice is not None:
            space[key] = rt.choice(dim.choice)
        elif dim.grid is not None:
            space[key] = rt.grid_search(dim.grid)
        elif dim.uniform is not None:
            space[key] = rt.uniform(*dim.uniform)
        else:
            assert dim.loguniform is not None
            space[key] = rt.loguniform(*dim.loguniform)
    return space


def concurrency(job: JobConfig, total_cpus: int, total_gpus: int) -> int:
    """Trials that fit at once: each needs `workers` x (cpus_per_worker CPUs [+ 1 GPU])."""
    tune = job.tune
    assert tune is not None
    if tune.max_concurrent:
        return tune.max_concurrent
    res = resources_for(job)
    fit = total_cpus // (res.cpus_per_worker * job.scaling.workers)
    if res.use_gpu:
        fit = min(fit, total_gpus // job.scaling.workers)
    return max(1, fit)


def trial_settings(job: JobConfig) -> dict[str, Any]:
    """What every trial adds to the base job (applied by the same function as --set): a checkpoint at every
    eval, so the best report always has a checkpoint to export, and the CPUs per worker resolved here, once."""
    return {"train.checkpoint_every": job.train.eval_every, "scaling.cpus_per_worker": resources_for(job).cpus_per_worker}


def space_corners(tune: TuneConfig) -> list[dict[str, Any]]:
    """Every combination of the values each dimension can take (choice and grid values, both bounds of a
    range): what the fit check looks at before a search starts."""
    keys = list(tune.space)
    values = [tune.space[k].values_to_check() for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def fit_budget(job: JobConfig, base: dict[str, Any], memory_limit: int | None, *, check_space: bool) -> planner.Budget:
    """The memory each trial's workers may use (host memory is shared by the trials that run at once).
    check_space: refuse the search (DoesNotFit) when no combination of the space is predicted to fit;
    the trials that do not fit are skipped one by one when they come up (`trial_fits`)."""
    tune = job.tune
    assert tune is not None
    gpus = planner.gpu_memory()
    budget = planner.budget_for(job, memory_limit, concurrent=concurrency(job, os.cpu_count() or 1, gpus[0] if gpus else 0))
    if check_space:
        verdicts = [planner.check(build_job(apply_overrides(base, corner))[0], budget) for corner in space_corners(tune)]
        if verdicts and not any(v.fits for v in verdicts):
            raise planner.DoesNotFit(f"no trial of the search is predicted to fit; e.g. {verdicts[0].message}")
    return budget


def trial_fits(job: JobConfig, trial_dir: Path, budget: planner.Budget | None) -> bool:
    """The seam between Tune and the planner: a trial predicted not to fit is recorded as skipped (why, in
    trial_dir/skipped.txt) instead of launching its workers."""
    (trial_dir / SKIPPED).unlink(missing_ok=True)
    if budget is None:
        return True
    verdict = planner.check(job, budget)
    if not verdict.fits:
        (trial_dir / SKIPPED).write_text(verdict.message)
    return verdict.fits


def run(
    job: JobConfig,
    base: dict[str, Any],
    *,
    search_dir: Path | None = None,
    resume: Path | None = None,
    stream: IO[str],
    fit_check: bool = True,
    memory_limit: int | None = None,
) -> dict[str, Any]:
    """fit_check: refuse a search none of whose trials is predicted to fit (planner.DoesNotFit), and skip
    the trials predicted not to fit; memory_limit: bytes per worker to check against (default: detected)."""
    import ray
    from ray import tune as rt

    from jobs.driver import tune_trial

    tune = job.tune
    assert tune is not None
    budget = fit_budget(job, base, memory_limit, check_space=not resume) if fit_check else None
    if resume:
        search_dir = resume.resolve()
    else:
        from datetime import datetime

        search_dir = (search_dir or Path(job.output) / f"{job.name}-search-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()
        search_dir.mkdir(parents=True, exist_ok=False)
        (search_dir / "tune.yaml").write_text(to_yaml(job))
        (search_dir / "base.json").write_text(json.dumps(base))
    mode = tune.resolved_mode
    cores = os.cpu_count() or 1
    base = apply_overrides(base, trial_settings(job))
    resources = resources_for(job)
    print(f"search directory: {search_dir}", file=stream, flush=True)
    t0 = time.time()
    from jobs import attempts

    attempts.record_invocation(search_dir, t0)
    started = False
    with output_to(search_dir / "ray.log") as user_stream:
        from jobs.tracking import Tracker

        # one parent MLflow run for the search (a --resume continues it); each trial logs a child run under it
        parent = Tracker(job, search_dir, user_stream, kinds=("mlflow",), tags={"rayft.kind": "search"},
                         params={f"tune.{k}": json.dumps(v) for k, v in job.tune.model_dump(mode="json").items()}).start(wait=True)
        try:
            started = ensure_local_ray(cores, dashboard=True)
            # Every row checked, and encoded where the disk allows, once for the whole search (beside the row
            # stores); trials read both back, and a trial that changes the model or columns makes its own.
            from jobs.driver import DATA_CACHE
            from jobs.encoded import encode_once
            from jobs.preflight import checked_stores
            from jobs.stream import index

            for which, said in encode_once(job, index(job, checked_stores(job, search_dir / DATA_CACHE)))[1].items():
                print(f"data.{which}: {said}", file=user_stream, flush=True)
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
                ),
                {"cpu": 0, "memory": 1},  # the trial only drives its TorchTrainer; the Train workers carry the CPUs
            )
            if resume:
                tuner = rt.Tuner.restore(str(search_dir / TUNER_DIR), trainable=trainable, resume_unfinished=True, resume_errored=False)
            else:
                scheduler = None
                if tune.scheduler == "asha":
                    from ray.tune.schedulers import ASHAScheduler

                    scheduler = ASHAScheduler(
                        time_attr="training_iteration",  # one iteration = one eval report (the first is step 0)
                        max_t=10**6,
                        grace_period=tune.grace_evals + 1,
                        reduction_factor=tune.reduction_factor,
                    )
                from ray.tune.search import BasicVariantGenerator

                # an embedded Ray's extra logical CPUs are Ray Data's (launch.data_cpus), not the trials'
                total_cpus = int(ray.cluster_resources().get("CPU", cores)) - (data_cpus() if started else 0)
                total_gpus = int(ray.cluster_resources().get("GPU", 0))
                tuner = rt.Tuner(
                    trainable,
                    param_space=param_space(tune),
                    tune_config=rt.TuneConfig(
                        metric=tune.metric,
                        mode=mode,
                        num_samples=tune.num_samples,
                        scheduler=scheduler,
                        # the limit goes to the generator: Tune ignores max_concurrent_trials when given a
                        # search-algorithm instance, and would start every trial at once
                        search_alg=BasicVariantGenerator(random_state=tune.seed, max_concurrent=concurrency(job, total_cpus, total_gpus)),
                    ),
                    run_config=rt.RunConfig(name=TUNER_DIR, storage_path=str(search_dir), verbose=0),
                )
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
    trial_records = [r for trial in (search_dir / "trials").glob("*") for r in read_metrics(trial)]
    earlier = attempts.invocations(search_dir, trial_records)[:-1]
    summary["invocations"] = [*earlier, {"started": t0, "wall_s": round(time.time() - t0, 1), "outcome": "this invocation"}]
    summary["wall_s"] = round(sum(i["wall_s"] for i in summary["invocations"]), 1)
    attempts.record_invocation(search_dir, t0, "completed")
    best = summary["best"]
    if best is None:
        parent.finish("failed")
        raise RunFailed(f"no trial reported {tune.metric} with a checkpoint; see {search_dir / 'results.md'}")
    trial_dir = search_dir / "trials" / best["trial"]
    trial, _ = build_job(load_raw(trial_dir / "job.yaml"))
    with output_to(search_dir / "export.log"):
        outcome = export_run(trial, trial_dir, Path(best["checkpoint"]), {"search": summary}, out_dir=search_dir / "best")
    summary["best_model"] = str(outcome.model_dir)
    summary["best_manifest"] = outcome.manifest
    write_report(search_dir, summary)
    from jobs.tracking import finish_search

    files = [search_dir / n for n in ("tune.yaml", "results.csv", "results.md", "metrics.png")] + [search_dir / "best" / "manifest.json"]
    finish_search(search_dir, summary, parent, files, outcome.model_dir, stream)
    return summary


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
        else:
            status = "failed" if not start else "stopped early"
        checkpoints = {}
        for meta in (trial_dir / "checkpoints").glob("checkpoint_*/metrics.json"):
            checkpoints[json.loads(meta.read_text())["step"]] = str(meta.parent)
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
                "memory": trial_memory(trial_dir),
            }
        )
    candidates = [t for t in trials if t["best_metric"] is not None and t["status"] != "failed"]
    best = better(candidates, key=lambda t: t["best_metric"]) if candidates else None
    return {"metric": tune.metric, "mode": mode, "scheduler": tune.scheduler, "trials": trials, "best": best,
            "trial_steps": sum(t["steps"] for t in trials)}


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
    files = [p for p in (trial_dir / "metrics.jsonl", trial_dir / "job.yaml") if p.is_file()]
    if len(files) < 2:
        return None
    return round(files[0].stat().st_mtime - files[1].stat().st_mtime, 1)


def report(search_dir: Path) -> Report:
    summary = summarize(search_dir)
    return write_report(search_dir, summary)

