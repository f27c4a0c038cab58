"""The whole report, written at the end of every `rayft tune` and by `rayft report SEARCH_DIR`: results.csv
and results.md (one row per trial), then metrics.png, frontier.md and frontier.png (write_report)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.search_report.frontier import frontier_markdown, memory_budget, tune_yaml
from orchestrator.search_report.frontier_chart import plot_frontier
from orchestrator.search_report.memory import gib, predicted
from orchestrator.search_report.metrics_chart import plot


@dataclass(frozen=True)
class Report:
    """What write_report wrote: the two markdown texts and every file's path."""

    results_md: str
    frontier_md: str
    files: dict[str, Path]  # results, results_csv, plot (metrics.png), frontier (frontier.png), frontier_md


def write_report(search_dir: Path, summary: dict[str, Any]) -> Report:
    """results.csv, results.md, metrics.png, frontier.png and frontier.md."""
    keys = sorted({k for t in summary["trials"] for k in t["overrides"]})
    header = ["trial", *keys, "status", summary["metric"], "best step", "steps", "wall s", "predicted GiB"]
    rows = []
    for t in summary["trials"]:
        mark = " (best)" if summary["best"] and t["trial"] == summary["best"]["trial"] else ""
        metric = "" if t["best_metric"] is None else f"{t['best_metric']:.4f}"
        rows.append([t["trial"] + mark, *[_fmt(t["overrides"].get(k)) for k in keys], t["status"] + (f": {t['reason']}" if t["reason"] else ""),
                     metric, t["best_step"] or "", f"{t['steps']}/{t['total_steps']}" if t["total_steps"] else "", t["wall_s"] or "",
                     gib(predicted(t))])
    files = {"results": search_dir / "results.md", "results_csv": search_dir / "results.csv", "plot": search_dir / "metrics.png",
             "frontier": search_dir / "frontier.png", "frontier_md": search_dir / "frontier.md"}
    with files["results_csv"].open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    md += f"\ntrial-steps in all: {summary['trial_steps']}\n"
    files["results"].write_text(md)
    plot(summary, files["plot"])
    settings = tune_yaml(search_dir)
    budget = memory_budget(settings)
    frontier_md = frontier_markdown(summary, budget, search_dir.name, str(settings.get("method") or ""))
    files["frontier_md"].write_text(frontier_md)
    plot_frontier(summary, files["frontier"], budget)
    return Report(md, frontier_md, files)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
