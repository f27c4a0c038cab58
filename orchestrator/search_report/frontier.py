"""Accuracy per memory: the Pareto-optimal trials (pareto), frontier.md (frontier_markdown), and the
search's memory budget read from its tune.yaml (tune_yaml, memory_budget)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.search_report.labels import trial_labels
from orchestrator.search_report.memory import gib, predicted


def tune_yaml(search_dir: Path) -> dict[str, Any]:
    """The search's job as written (unvalidated: a key this version does not know is no error), or {}."""
    from orchestrator.config import ConfigError, load_raw

    try:
        return load_raw(search_dir / "tune.yaml")
    except ConfigError:
        return {}


def memory_budget(job: dict[str, Any]) -> int | None:
    """The job's tune.memory_budget (`16GiB`, or bytes) in bytes, or None when the search had none."""
    from orchestrator.config import parse_size

    tune = job.get("tune")
    value = tune.get("memory_budget") if isinstance(tune, dict) else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    try:
        return parse_size(str(value))
    except ValueError:
        return None


def _candidate(t: dict[str, Any]) -> bool:
    return t["best_metric"] is not None and predicted(t) is not None and t["status"] not in ("failed", "skipped")


def pareto(trials: Sequence[dict[str, Any]], mode: str) -> list[str]:
    """The Pareto-optimal trials' names (in trial order): of the trials with a best metric and a predicted
    memory (failed and skipped ones aside), those no other trial dominates, i.e. none has at most as
    much memory and a metric at least as good, and is strictly better in one of the two. Trials equal in
    both are all optimal."""
    sign = 1 if mode == "max" else -1
    points = [(t["trial"], predicted(t), sign * t["best_metric"]) for t in trials if _candidate(t)]
    return [name for name, m, v in points
            if not any(m2 <= m and v2 >= v and (m2 < m or v2 > v) for _, m2, v2 in points)]  # type: ignore[operator]


def memory_device(trials: Sequence[dict[str, Any]]) -> str | None:
    """The device the trials' memory was predicted for (the first trial that names one), or None."""
    return next(((t.get("memory") or {}).get("device") for t in trials if (t.get("memory") or {}).get("device")), None)


def memory_unit(device: str | None) -> str:
    """What the memory is per: GPU, CPU worker, or worker when the device is unknown."""
    return {"gpu": "GPU", "cpu": "CPU worker"}.get(device or "", "worker")


def frontier_markdown(summary: dict[str, Any], budget: int | None, name: str = "", method: str = "") -> str:
    """frontier.md: every trial sorted by predicted memory, with its best metric, measured memory and
    whether it is Pareto-optimal; method: the base job's (a trial's own override wins)."""
    from orchestrator.run_report import md_table

    trials, metric, mode = summary["trials"], summary["metric"], summary["mode"]
    best = summary["best"]["trial"] if summary["best"] else None
    labels, optimal = trial_labels(trials), set(pareto(trials, mode))
    device = memory_device(trials)
    per = memory_unit(device)
    out = [f"# Accuracy per memory{f': {name}' if name else ''}", "",
           f"Each trial's best {metric} ({mode}) against its **predicted** memory per {per}: the planner's figure for the "
           "trial's job, the one the memory budget is checked against.",
           "",
           "Measured: `cuda_peak` is torch.cuda.max_memory_allocated on rank 0's GPU; `host_rss` is the peak RSS of rank 0's "
           "whole worker process (Python, torch, Ray and the data stream as well as the model), so on CPU it is not the same "
           "quantity as the prediction (the model's training memory, plus the planner's flat allowance for the runtime).",
           "",
           "Pareto-optimal: no other trial has at most as much predicted memory and a metric at least as good, and is strictly "
           "better in one of the two. Skipped trials were predicted not to fit and have no metric.",
           "",
           f"Memory budget: {f'{gib(budget)} GiB per {per} (tune.memory_budget)' if budget else 'none set (tune.memory_budget)'}.",
           "", "![best metric against predicted memory per worker](frontier.png)", ""]
    rows = []
    for t in sorted(trials, key=lambda t: (predicted(t) is None, predicted(t) or 0, t["trial"])):
        memory = t.get("memory") or {}
        measured = memory.get("measured_bytes")
        rows.append((t["trial"] + (" (best)" if t["trial"] == best else ""), labels[t["trial"]], str(t["overrides"].get("method") or method), _status(t),
                     "" if t["best_metric"] is None else f"{t['best_metric']:.4f}", gib(predicted(t)),
                     "" if measured is None else f"{gib(measured)} ({memory.get('measured_kind')})",
                     "yes" if t["trial"] in optimal else "no"))
    out += md_table(["trial", "hyperparameters", "method", "status", f"best {metric}", "predicted GiB", "measured GiB (kind)", "pareto"], rows)
    front = [t for t in trials if t["trial"] in optimal]
    front.sort(key=lambda t: predicted(t) or 0)
    out += ["", "Pareto frontier, by predicted memory: " + ("; ".join(
        f"{labels[t['trial']]} ({t['best_metric']:.4f} at {gib(predicted(t))} GiB)" for t in front) or "none (no trial has both a metric and a prediction)")]
    return "\n".join(out) + "\n"


def _status(t: dict[str, Any]) -> str:
    return "stopped early @" + str(t["steps"]) if t["status"] == "stopped early" else t["status"]
