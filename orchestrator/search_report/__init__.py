"""A search's report: written at the end of every `rayft tune`, and again by `rayft report SEARCH_DIR`.

    results.csv / .md    one row per trial: overrides, status (with the reason), best metric, steps, wall
                         time and the planner's predicted memory per worker
    metrics.png          every trial's eval metric over optimizer steps: one line per trial, labelled in the
                         legend with its hyperparameters (lr=5e-3 r=16) and how it ended
    frontier.png / .md   each trial's best metric against its predicted memory per worker, the Pareto
                         frontier (the best metric reachable within a memory) joined by a step line, skipped
                         trials at the bottom and the search's memory budget as a dashed line

Each trial's memory comes from trials/<trial>/memory.json, which orchestrator.trial.tune_trial writes before the
trial launches (the planner's prediction, `write_trial_memory`), and from the peaks its metrics.jsonl
records (measured, `trial_memory`).

This package reads the summary orchestrator.search.summarize builds and never imports orchestrator.search
(search imports it). Drawing is PIL only, with orchestrator.run_report's helpers. Which file holds what,
each importing only the ones above it:

  memory.py          each trial's predicted and measured memory (write_trial_memory, trial_memory)
  labels.py          trials' short hyperparameter labels, status marks, ranking
  frontier.py        the Pareto-optimal trials, frontier.md, the search's memory budget
  draw.py            drawing helpers both charts use: axes, ticks, markers, trial styles
  metrics_chart.py   metrics.png (plot)
  frontier_chart.py  frontier.png (plot_frontier)
  write.py           the whole report (write_report, Report)

This module re-exports what the search, the trial and the tests use.
"""

from orchestrator.search_report.draw import ticks
from orchestrator.search_report.frontier import frontier_markdown, memory_budget, pareto
from orchestrator.search_report.frontier_chart import plot_frontier
from orchestrator.search_report.labels import short_value, status_mark, trial_labels
from orchestrator.search_report.memory import GiB, MiB, trial_memory, write_trial_memory
from orchestrator.search_report.metrics_chart import offset_fraction, plot, shifts
from orchestrator.search_report.write import Report, write_report

__all__ = [
    "GiB",
    "MiB",
    "Report",
    "frontier_markdown",
    "memory_budget",
    "offset_fraction",
    "pareto",
    "plot",
    "plot_frontier",
    "short_value",
    "shifts",
    "status_mark",
    "ticks",
    "trial_labels",
    "trial_memory",
    "write_report",
    "write_trial_memory",
]
