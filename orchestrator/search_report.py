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

This module reads the summary orchestrator.search.summarize builds and never imports orchestrator.search
(search imports it). Drawing is PIL only, with orchestrator.run_report's helpers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.metrics_log import read_metrics
from orchestrator.run_report import PALETTE, _font, _wrap, nice_ticks, polyline, save_png, tick_label

if TYPE_CHECKING:
    from orchestrator.config import JobConfig
    from orchestrator.planner import Budget

MEMORY = "memory.json"  # in a trial directory: the planner's predicted bytes per worker, and on which device
GiB = 2**30
MiB = 2**20

Point = tuple[float, float]
Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class Report:
    """What write_report wrote: the two markdown texts and every file's path."""

    results_md: str
    frontier_md: str
    files: dict[str, Path]  # results, results_csv, plot (metrics.png), frontier (frontier.png), frontier_md


# ---- per-trial memory -------------------------------------------------------------------------------


def write_trial_memory(job: JobConfig, trial_dir: Path, budget: Budget | None) -> dict[str, Any]:
    """trial_dir/memory.json: the planner's predicted total per worker for this trial's job on the budget's
    device (the one its fit check uses; without a budget, this machine's), or null with predicted_error
    when the planner cannot read the model."""
    from orchestrator import planner

    device = budget.device if budget is not None else planner.budget_for(job).device
    out: dict[str, Any] = {"device": device, "predicted_bytes": None}
    try:
        out["predicted_bytes"] = planner.plan(job, planner.load_shape(job.model), device).total
    except Exception as e:  # PlanError (no config.json), an architecture outside the matrix: a report never fails a trial
        out["predicted_error"] = str(e)
    (trial_dir / MEMORY).write_text(json.dumps(out, indent=2))
    return out


def trial_memory(trial_dir: Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A trial's memory per worker: predicted (memory.json) and measured (the largest peak its train
    records carry, all from rank 0's worker).

    On GPU the measured number is torch.cuda.max_memory_allocated ("cuda_peak"), close to what the
    planner predicts (the CUDA context and the allocator's cache aside). On CPU it is the peak RSS of
    the whole worker process ("host_rss": Python, torch, Ray and the data stream as well as the model),
    while the prediction is the model's training memory (plus the planner's flat allowance for the
    runtime): on CPU the two are not the same quantity, and one does not check the other."""
    try:
        saved = json.loads((trial_dir / MEMORY).read_text())
    except (OSError, ValueError):
        saved = {}
    records = read_metrics(trial_dir) if records is None else records  # summarize passes what it read
    cuda = [r["cuda_peak_mib"] for r in records if isinstance(r.get("cuda_peak_mib"), int | float)]
    rss = [r["peak_rss_mib"] for r in records if isinstance(r.get("peak_rss_mib"), int | float)]
    device = saved.get("device")
    if cuda and device in ("gpu", None):
        measured, kind = max(cuda) * MiB, "cuda_peak"
    elif rss:
        measured, kind = max(rss) * MiB, "host_rss"
    else:
        measured, kind = None, None
    return {"device": device, "predicted_bytes": saved.get("predicted_bytes"),
            "measured_bytes": None if measured is None else int(measured), "measured_kind": kind}


def _predicted(t: dict[str, Any]) -> int | None:
    return (t.get("memory") or {}).get("predicted_bytes")


def _gib(n: float | None) -> str:
    # three decimals under 10 GiB: small models' trials differ by MiB, which two decimals would hide
    return "" if n is None else f"{n / GiB:.3f}" if n < 10 * GiB else f"{n / GiB:.2f}"


# ---- labels -----------------------------------------------------------------------------------------

SHORT = {"train.lr": "lr", "lora.rank": "r", "lora.alpha": "alpha", "train.epochs": "ep", "precision": "precision",
         "method": "method", "quantization.type": "quant", "train.seed": "seed"}


def short_key(key: str) -> str:
    """train.lr -> lr, lora.rank -> r, ...; any other dotted key: its last part."""
    return SHORT.get(key, key.rsplit(".", 1)[-1])


def short_value(v: Any) -> str:
    """0.005 -> 5e-3, 0.000736 -> 7.36e-3, 0.05 -> 0.05, 32.0 -> 32, True -> true."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != 0 and (abs(v) < 0.01 or abs(v) >= 1e5):
            mantissa, exponent = f"{v:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{v:.3g}"
    return str(v)


def override_keys(trials: Sequence[dict[str, Any]]) -> list[str]:
    """Every searched key, in the order the trials list them."""
    keys: dict[str, None] = {}
    for t in trials:
        keys.update(dict.fromkeys(t["overrides"]))
    return list(keys)


def hp_label(overrides: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """A trial's hyperparameters, short: `lr=5e-3 r=16`."""
    parts = [f"{short_key(k)}={short_value(overrides[k])}" for k in (keys or list(overrides)) if k in overrides]
    return " ".join(parts) or "(base job)"


def trial_labels(trials: Sequence[dict[str, Any]]) -> dict[str, str]:
    """trial name -> its hyperparameter label; trials whose labels are the same (num_samples repeats a
    grid point) get their trial number appended: `lr=5e-3 #2`."""
    keys = override_keys(trials)
    labels = {t["trial"]: hp_label(t["overrides"], keys) for t in trials}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    for i, t in enumerate(trials):
        if counts[labels[t["trial"]]] > 1:
            labels[t["trial"]] += f" #{_number(t['trial'], i)}"
    return labels


def group_label(group: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """One label for the trials drawn at one point: their distinct hyperparameters (three, then `+N`),
    and how many trials when more than one: `r=16 lr=5e-3 (4 trials)`."""
    distinct = list(dict.fromkeys(hp_label(t["overrides"], keys) for t in group))
    text = ", ".join(distinct[:3]) + (f" +{len(distinct) - 3}" if len(distinct) > 3 else "")
    return text + (f" ({len(group)} trials)" if len(group) > 1 else "")


def _number(trial: str, default: int) -> int:
    """Tune's trial number: tune_trial_71404_00003 -> 3."""
    tail = trial.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else default


def status_mark(t: dict[str, Any], best: str | None) -> str:
    """`best`, `stopped @8`, `best, stopped @8`, `skipped`, `failed`, or "" (finished)."""
    marks = ["best"] if t["trial"] == best else []
    if t["status"] == "stopped early":
        marks.append(f"stopped @{t['steps']}")
    elif t["status"] in ("skipped", "failed"):
        marks.append(t["status"])
    return ", ".join(marks)


def key_legend(trials: Sequence[dict[str, Any]]) -> str:
    """`lr = train.lr, r = lora.rank`: what the short names stand for."""
    return ", ".join(f"{short_key(k)} = {k}" for k in override_keys(trials) if short_key(k) != k)


def ranked(trials: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best metric first (max or min); trials without one last, each group in trial order."""
    sign = -1 if mode == "max" else 1
    scored = sorted((t for t in trials if t["best_metric"] is not None), key=lambda t: sign * t["best_metric"])
    return scored + [t for t in trials if t["best_metric"] is None]


# ---- results.csv / results.md, and the whole report -------------------------------------------------


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
                     _gib(_predicted(t))])
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


# ---- drawing helpers ---------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "triangle_down", "pentagon", "hexagon", "plus")  # 8 shapes x 9 colours: 72 distinct
FAILED, GREY = "#d62728", "#c8c8c8"


def style(i: int) -> tuple[str, str]:
    """Trial i's colour and marker shape (8 shapes against 9 colours: no pair repeats before trial 72)."""
    return PALETTE[i % len(PALETTE)], SHAPES[i % len(SHAPES)]


def marker(d: Any, centre: Point, shape: str, colour: str, radius: float = 4, hollow: bool = False) -> None:
    cx, cy = centre
    fill, outline = (None, colour) if hollow else (colour, colour)
    if shape == "circle":
        d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=outline, width=2 if hollow else 1)
    elif shape == "square":
        r = radius * 0.85
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=2 if hollow else 1)
    elif shape == "plus":
        d.line([(cx - radius, cy), (cx + radius, cy)], fill=colour, width=2)
        d.line([(cx, cy - radius), (cx, cy + radius)], fill=colour, width=2)
    elif shape == "x":
        r = radius * 0.85
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=2)
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=colour, width=2)
    else:
        sides, start = {"triangle": (3, -90), "triangle_down": (3, 90), "diamond": (4, -90), "pentagon": (5, -90), "hexagon": (6, 0)}[shape]
        r = radius * (1.25 if sides == 3 else 1.1)
        pts = [(cx + r * math.cos(math.radians(start + 360 * k / sides)), cy + r * math.sin(math.radians(start + 360 * k / sides))) for k in range(sides)]
        d.polygon(pts, fill=fill, outline=outline, width=2 if hollow else 1)


def ticks(lo: float, hi: float, *, inside: bool = False, integer: bool = False) -> list[float]:
    """4 to 8 round ticks (run_report.nice_ticks) for lo..hi: within it (inside; an axis that spans the
    data exactly) or with the first and last enclosing it; integer: whole-number spacing (steps)."""
    if hi - lo < 1e-12:
        lo, hi = (lo, lo + 1.0) if lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
    fallback: list[float] = []
    for n in (6, 5, 7, 4, 8, 3, 9, 10):
        found = nice_ticks(lo, hi, n)
        if inside:
            eps = (hi - lo) * 1e-9
            found = [v for v in found if lo - eps <= v <= hi + eps]
        if integer and len(found) > 1 and not float(round(found[1] - found[0], 9)).is_integer():
            continue
        if 4 <= len(found) <= 8:
            return found
        fallback = fallback or found
    return fallback or [lo, hi]


def vertical_text(img: Any, centre: Point, text: str, font: Any, fill: str = "#444444") -> None:
    """Text turned 90 degrees (reading upwards), centred on centre: a y axis's label."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    tmp = Image.new("RGBA", (int(right - left) + 4, int(bottom - top) + 4), (255, 255, 255, 0))
    ImageDraw.Draw(tmp).text((2 - left, 2 - top), text, font=font, fill=fill)
    turned = tmp.rotate(90, expand=True)
    img.paste(turned, (int(centre[0] - turned.width / 2), int(centre[1] - turned.height / 2)), turned)


def chart(
    img: Any, d: Any, box: Box, xt: Sequence[float], yt: Sequence[float], title: str, y_label: str,
    x_range: tuple[float, float] | None = None,
) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """Axes: grid lines at the ticks, the y ticks' labels, a frame, the title and the y axis's label (x_axis
    draws the x ticks' labels); the y axis spans its outer ticks, the x axis x_range (default: its outer ticks). Returns the maps from
    data to pixels."""
    left, top, right, bottom = box
    (x0, x1), (y0, y1) = x_range or (xt[0], xt[-1]), (yt[0], yt[-1])
    pad = 8  # points at the range's ends stay off the frame
    sx = lambda v: left + pad + (v - x0) / max(x1 - x0, 1e-12) * (right - left - 2 * pad)  # noqa: E731
    sy = lambda v: bottom - pad - (v - y0) / max(y1 - y0, 1e-12) * (bottom - top - 2 * pad)  # noqa: E731
    small = _font(13)
    y_step = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in yt:
        d.line([(left, sy(v)), (right, sy(v))], fill="#e4e4e4")
        d.text((left - 6, sy(v)), tick_label(v, y_step, top=max(abs(yt[0]), abs(yt[-1]))), fill="black", font=small, anchor="rm")
    for v in xt:
        d.line([(sx(v), top), (sx(v), bottom)], fill="#e4e4e4")
    d.rectangle((left, top, right, bottom), outline="black")
    d.text((left, top - 28), title, fill="black", font=_font(17), anchor="ls")
    vertical_text(img, (left - 62, (top + bottom) / 2), y_label, small)
    return sx, sy


def x_axis(d: Any, sx: Callable[[float], float], xt: Sequence[float], y: float, label: str, centre: float) -> None:
    """The x ticks' marks and labels under a frame whose bottom is y, and the axis's label."""
    small = _font(13)
    step = xt[1] - xt[0] if len(xt) > 1 else 1.0
    for v in xt:
        d.line([(sx(v), y), (sx(v), y + 4)], fill="black")
        d.text((sx(v), y + 6), tick_label(v, step, top=max(abs(xt[0]), abs(xt[-1]))), fill="black", font=small, anchor="mt")
    d.text((centre, y + 26), label, fill="#444444", font=small, anchor="mt")


def _measure() -> Any:
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _wrapped(notes: Sequence[str], font: Any, width: float) -> list[str]:
    d = _measure()
    return [line for note in notes for line in _wrap(d, note, font, width)]


def _y_ticks(values: Sequence[float]) -> list[float]:
    return ticks(min(values, default=0.0), max(values, default=1.0))


# ---- metrics.png --------------------------------------------------------------------------------------

LEGEND_ALL = 40  # up to this many trials the legend lists every one; beyond, the best LEGEND_TOP
LEGEND_TOP = 20
ROW = 20  # a legend row's height
PLOT_W, PLOT_H, LEFT, TOP = 720, 420, 90, 70


def offset_fraction(n: int) -> float:
    """Of the y span, the step between the vertical shifts of n curves: 1%, less when many (the whole fan
    stays within about 4% of the span)."""
    return 0.0 if n < 2 else min(0.01, 0.04 / (n - 1))


def shifts(names: Sequence[str], best: str | None, fraction: float) -> dict[str, float]:
    """Each curve's vertical shift, as a fraction of the y span: none for the best trial (its curve and
    ringed point are exact); the others, in trial order, +1, -1, +2, -2, ... times fraction."""
    out, k = {}, 0
    for name in names:
        if name == best:
            out[name] = 0.0
            continue
        k += 1
        out[name] = (1 if k % 2 else -1) * ((k + 1) // 2) * fraction
    return out


def plot(summary: dict[str, Any], path: Path) -> tuple[int, int]:
    """metrics.png: every trial's eval metric by optimizer step, one line per trial (its own colour and
    marker shape), labelled in the legend with its hyperparameters, best metric and how it ended;
    stopped-early trials dashed (ending where they stopped), failed ones red, the winner thick and black,
    its best point ringed. Every curve but the best is shifted vertically by a small deterministic fraction
    of the y span (shifts, offset_fraction) so identical curves stay apart, as the footnote says. A trial that ran in several
    attempts draws each attempt's points as its own line. The image grows with the trials so the legend
    fits (past LEGEND_ALL trials it lists the best LEGEND_TOP and draws the rest grey). Returns its size."""
    from PIL import Image, ImageDraw

    trials, metric, mode = summary["trials"], summary["metric"], summary["mode"]
    best = summary["best"]["trial"] if summary["best"] else None
    labels = trial_labels(trials)
    index = {t["trial"]: i for i, t in enumerate(trials)}
    order = ranked(trials, mode)
    listed = order if len(order) <= LEGEND_ALL else order[:LEGEND_TOP]
    more = len(order) - len(listed)
    font, bold = _font(14), _font(15)
    texts = {t["trial"]: _legend_text(t, labels[t["trial"]], best) for t in listed}
    legend_w = int(min(max([_measure().textlength(s, font=font) for s in texts.values()] + [200]) + 50, 560))
    rows = 1 + len(listed) + (1 if more else 0)
    left, top = LEFT, TOP
    right, bottom = left + PLOT_W, top + max(PLOT_H, rows * ROW + 10)
    width = right + 30 + legend_w + 16
    curves = [t for t in trials if t["curve"]]
    fraction = offset_fraction(len(curves))
    notes = _metrics_notes(summary, fraction, more)
    note_lines = _wrapped(notes, _font(13), width - 40)
    height = bottom + 56 + 17 * len(note_lines) + 12
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    totals = [t["total_steps"] or 0 for t in trials]
    x1 = float(max([s for t in curves for s, _ in t["curve"]] + totals + [1]))
    xt = ticks(0.0, x1, inside=True, integer=True)
    values = [v for t in curves for _, v in t["curve"]]
    yt = _y_ticks(values)
    title = f"{metric} by optimizer step  ·  {summary['scheduler'].upper()} search, {len(trials)} trial{'s' * (len(trials) != 1)}"
    sx, sy = chart(img, d, (left, top, right, bottom), xt, yt, title, metric, x_range=(0.0, x1))
    x_axis(d, sx, xt, bottom, "optimizer step", (left + right) / 2)
    if not curves:
        d.text(((left + right) / 2, (top + bottom) / 2), f"no trial reported {metric}", fill="#888888", font=_font(15), anchor="mm")
    span = yt[-1] - yt[0]
    shift = {name: f * span for name, f in shifts([t["trial"] for t in curves], best, fraction).items()}
    in_legend = {t["trial"] for t in listed}
    for t in sorted(curves, key=lambda t: (t["trial"] in in_legend, t["trial"] == best)):  # grey first, the winner on top
        colour, shape = _trial_style(t, index[t["trial"]], best, t["trial"] in in_legend)
        lines = t.get("segments") or [t["curve"]]
        for segment in lines:
            pts = [(sx(s), sy(v + shift[t["trial"]])) for s, v in segment]
            polyline(d, pts, colour, 4 if t["trial"] == best else (2 if t["trial"] in in_legend else 1), dashed=t["status"] == "stopped early")
            if t["trial"] in in_legend:
                every = max(1, math.ceil(len(pts) / 30))
                for p in pts[::every] + ([pts[-1]] if (len(pts) - 1) % every else []):
                    marker(d, p, shape, colour, 5 if t["trial"] == best else 4)
    if summary["best"] and summary["best"]["best_step"] is not None:
        b = summary["best"]
        _ring_best(d, (sx(b["best_step"]), sy(b["best_metric"])), f"best {b['best_metric']:.4f} @ step {b['best_step']}",
                   mode, (left, top, right, bottom), font)

    lx = right + 30
    d.text((lx, top + 4), f"trials, by best {metric}", fill="black", font=bold, anchor="ls")
    y = top + 12
    for t in listed:
        colour, shape = _trial_style(t, index[t["trial"]], best, True)
        mid = y + ROW / 2
        if t["curve"]:
            polyline(d, [(lx, mid), (lx + 32, mid)], colour, 4 if t["trial"] == best else 2, dashed=t["status"] == "stopped early")
        marker(d, (lx + 16, mid), shape, colour, 5 if t["trial"] == best else 4, hollow=not t["curve"])
        d.text((lx + 42, mid), texts[t["trial"]], fill="black", font=font, anchor="lm")
        y += ROW
    if more:
        d.text((lx + 42, y + ROW / 2), f"+{more} more (grey; see results.md)", fill="#444444", font=font, anchor="lm")
    y = bottom + 52
    for line in note_lines:
        d.text((20, y), line, fill="#444444", font=_font(13))
        y += 17
    save_png(img, path)
    return width, height


def _ring_best(d: Any, at: Point, note: str, mode: str, box: Box, font: Any) -> None:
    """Ring the best point and name it: on the side no other curve's better value can be (above it for a
    metric to maximise, below for one to minimise), else beside it, inside the frame."""
    (px, py), (left, top, right, bottom) = at, box
    d.ellipse((px - 10, py - 10, px + 10, py + 10), outline="black", width=2)
    w = d.textlength(note, font=font)
    cx = min(max(px, left + 4 + w / 2), right - 4 - w / 2)
    if mode == "max" and py - 32 > top:
        d.text((cx, py - 13), note, fill="black", font=font, anchor="mb")
    elif mode == "min" and py + 32 < bottom:
        d.text((cx, py + 13), note, fill="black", font=font, anchor="mt")
    else:
        y, anchor = (py + 12, "t") if mode == "max" else (py - 12, "b")
        if px + 14 + w < right:
            d.text((px + 14, y), note, fill="black", font=font, anchor="l" + anchor)
        else:
            d.text((px - 14, y), note, fill="black", font=font, anchor="r" + anchor)


def _trial_style(t: dict[str, Any], i: int, best: str | None, listed: bool) -> tuple[str, str]:
    colour, shape = style(i)
    if t["trial"] == best:
        colour = "black"
    elif t["status"] == "failed":
        colour = FAILED
    elif not listed:
        colour = GREY
    return colour, shape


def _legend_text(t: dict[str, Any], label: str, best: str | None) -> str:
    metric = "-" if t["best_metric"] is None else f"{t['best_metric']:.4f}"
    mark = status_mark(t, best)
    return f"{label}   {metric}" + (f"   {mark}" if mark else "")


def _metrics_notes(summary: dict[str, Any], fraction: float, more: int) -> list[str]:
    keys = key_legend(summary["trials"])
    notes = [
        f"One line per trial, labelled with its hyperparameters{f' ({keys})' if keys else ''} and its best {summary['metric']}; "
        f"dashed: stopped early{' by ASHA' if summary['scheduler'] == 'asha' else ''}, ending at its last eval; "
        "thick black: the best trial (its best point ringed); red: failed; skipped trials (predicted not to fit) have no line.",
    ]
    if fraction:
        notes.append(f"So that identical curves stay apart, every trial has its own marker and every curve but the best "
                     f"one is drawn shifted vertically, in trial order, by +1, -1, +2, -2, ... times {fraction:.2%} of the "
                     "y span (at most about 2% either way); read exact values in results.md.")
    if more:
        notes.append(f"The legend lists the best {LEGEND_TOP} trials; the other {more} are drawn thin and grey.")
    return notes


# ---- the frontier: frontier.png / frontier.md --------------------------------------------------------


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
    return t["best_metric"] is not None and _predicted(t) is not None and t["status"] not in ("failed", "skipped")


def pareto(trials: Sequence[dict[str, Any]], mode: str) -> list[str]:
    """The Pareto-optimal trials' names (in trial order): of the trials with a best metric and a predicted
    memory (failed and skipped ones aside), those no other trial dominates, i.e. none has at most as
    much memory and a metric at least as good, and is strictly better in one of the two. Trials equal in
    both are all optimal."""
    sign = 1 if mode == "max" else -1
    points = [(t["trial"], _predicted(t), sign * t["best_metric"]) for t in trials if _candidate(t)]
    return [name for name, m, v in points
            if not any(m2 <= m and v2 >= v and (m2 < m or v2 > v) for _, m2, v2 in points)]  # type: ignore[operator]


def _device(trials: Sequence[dict[str, Any]]) -> str | None:
    return next(((t.get("memory") or {}).get("device") for t in trials if (t.get("memory") or {}).get("device")), None)


def _per(device: str | None) -> str:
    return {"gpu": "GPU", "cpu": "CPU worker"}.get(device or "", "worker")


def frontier_markdown(summary: dict[str, Any], budget: int | None, name: str = "", method: str = "") -> str:
    """frontier.md: every trial sorted by predicted memory, with its best metric, measured memory and
    whether it is Pareto-optimal; method: the base job's (a trial's own override wins)."""
    from orchestrator.run_report import md_table

    trials, metric, mode = summary["trials"], summary["metric"], summary["mode"]
    best = summary["best"]["trial"] if summary["best"] else None
    labels, optimal = trial_labels(trials), set(pareto(trials, mode))
    device = _device(trials)
    per = _per(device)
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
           f"Memory budget: {f'{_gib(budget)} GiB per {per} (tune.memory_budget)' if budget else 'none set (tune.memory_budget)'}.",
           "", "![best metric against predicted memory per worker](frontier.png)", ""]
    rows = []
    for t in sorted(trials, key=lambda t: (_predicted(t) is None, _predicted(t) or 0, t["trial"])):
        memory = t.get("memory") or {}
        measured = memory.get("measured_bytes")
        rows.append((t["trial"] + (" (best)" if t["trial"] == best else ""), labels[t["trial"]], str(t["overrides"].get("method") or method), _status(t),
                     "" if t["best_metric"] is None else f"{t['best_metric']:.4f}", _gib(_predicted(t)),
                     "" if measured is None else f"{_gib(measured)} ({memory.get('measured_kind')})",
                     "yes" if t["trial"] in optimal else "no"))
    out += md_table(["trial", "hyperparameters", "method", "status", f"best {metric}", "predicted GiB", "measured GiB (kind)", "pareto"], rows)
    front = [t for t in trials if t["trial"] in optimal]
    front.sort(key=lambda t: _predicted(t) or 0)
    out += ["", "Pareto frontier, by predicted memory: " + ("; ".join(
        f"{labels[t['trial']]} ({t['best_metric']:.4f} at {_gib(_predicted(t))} GiB)" for t in front) or "none (no trial has both a metric and a prediction)")]
    return "\n".join(out) + "\n"


def _status(t: dict[str, Any]) -> str:
    return "stopped early @" + str(t["steps"]) if t["status"] == "stopped early" else t["status"]


FRONT, OTHER = "#1f4e9e", "#9a9a9a"


def plot_frontier(summary: dict[str, Any], path: Path, budget: int | None) -> tuple[int, int]:
    """frontier.png: each trial's best metric against its predicted memory per worker (GiB); the Pareto-
    optimal trials filled blue, labelled with their hyperparameters and joined by a step line (the best
    metric reachable within a memory); other trials grey, failed ones a red x; trials with no metric
    (skipped: predicted not to fit; or none reported) hollow in a strip under the axes at their predicted
    memory; the memory budget a dashed vertical line. Returns the image's size."""
    from PIL import Image, ImageDraw

    trials, metric, mode = summary["trials"], summary["metric"], summary["mode"]
    best = summary["best"]["trial"] if summary["best"] else None
    optimal = pareto(trials, mode)
    placed = [t for t in trials if _predicted(t) is not None]
    scored = [t for t in placed if t["best_metric"] is not None and t["status"] != "skipped"]
    unscored = [t for t in placed if t not in scored]
    per = _per(_device(trials))
    notes = [f"x: the planner's predicted memory per {per} for each trial's job (what a memory budget is checked against); "
             "measured peaks are in frontier.md. Pareto-optimal: no other trial has at most as much memory and a metric at least as good, "
             "strictly better in one; the step line is the best metric reachable within a memory."]
    if len(placed) < len(trials):
        notes.append(f"{len(trials) - len(placed)} trial(s) without a prediction (the planner could not read the model) are not drawn.")
    note_lines = _wrapped(notes, _font(13), 1100 - 40)
    left, top, right, bottom = LEFT, TOP, LEFT + 760, TOP + 420
    strip = (bottom + 10, bottom + 46)
    width, height = 1100, strip[1] + 60 + 17 * len(note_lines) + 12
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    xs = [_predicted(t) / GiB for t in placed] + ([budget / GiB] if budget else [])  # type: ignore[operator]
    xt = ticks(min(xs, default=0.0), max(xs, default=1.0))
    yt = _y_ticks([t["best_metric"] for t in scored])
    title = f"best {metric} vs predicted memory per {per}  ·  {len(trials)} trials, {len(optimal)} Pareto-optimal"
    sx, sy = chart(img, d, (left, top, right, bottom), xt, yt, title, f"best {metric}")
    d.rectangle((left, strip[0], right, strip[1]), outline="black")
    d.text((left - 6, (strip[0] + strip[1]) / 2), "no metric", fill="black", font=_font(13), anchor="rm")
    x_axis(d, sx, xt, strip[1], f"predicted memory per {per} (GiB)", (left + right) / 2)
    if not scored:
        d.text(((left + right) / 2, (top + bottom) / 2), f"no trial has both {metric} and a predicted memory", fill="#888888", font=_font(15), anchor="mm")
    if budget:
        bx = sx(budget / GiB)
        polyline(d, [(bx, top), (bx, strip[1])], FAILED, 2, dashed=True)
        d.text((bx - 4, top + 6), f"budget {_gib(budget)} GiB", fill=FAILED, font=_font(13), anchor="rt")
    front = sorted((t for t in trials if t["trial"] in set(optimal)), key=lambda t: (_predicted(t), -_sign(mode) * t["best_metric"]))
    pts = [(sx(_predicted(t) / GiB), sy(t["best_metric"])) for t in front]  # type: ignore[operator]
    stairs = [p for a, b in zip(pts, pts[1:], strict=False) for p in (a, (b[0], a[1]))] + pts[-1:]
    if pts:
        stairs.append((right - 8, pts[-1][1]))  # the best metric stays reachable with more memory
        d.line(stairs, fill=FRONT, width=2)
    for t in scored:
        p = (sx(_predicted(t) / GiB), sy(t["best_metric"]))  # type: ignore[operator]
        if t["status"] == "failed":
            marker(d, p, "x", FAILED, 5)
        elif t["trial"] not in optimal:
            marker(d, p, "circle", OTHER, 4)
    for t in front:
        p = (sx(_predicted(t) / GiB), sy(t["best_metric"]))  # type: ignore[operator]
        marker(d, p, "circle", FRONT, 6)
        if t["trial"] == best:
            d.ellipse((p[0] - 10, p[1] - 10, p[0] + 10, p[1] + 10), outline="black", width=2)
    keys = override_keys(trials)
    _label_front(d, front, keys, best, sx, sy, (left, top, right, bottom))
    _no_metric_strip(d, unscored, keys, sx, (left, strip[0], right, strip[1]))
    _frontier_key(d, (right + 24, top), budget is not None)
    y = strip[1] + 56
    for line in note_lines:
        d.text((20, y), line, fill="#444444", font=_font(13))
        y += 17
    save_png(img, path)
    return width, height


def _no_metric_strip(d: Any, trials: Sequence[dict[str, Any]], keys: Sequence[str], sx: Callable[[float], float], strip: Box) -> None:
    """Hollow markers at the trials' predicted memory (red: failed), the trials at one spot sharing a
    label, kept inside the strip."""
    left, top, right, _ = strip
    font = _font(11)
    groups: dict[int, list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault(round(sx(_predicted(t) / GiB)), []).append(t)  # type: ignore[operator]
    for px, ts in groups.items():
        for t in ts:
            marker(d, (px, top + 11), "circle", FAILED if t["status"] == "failed" else OTHER, 5, hollow=True)
        text = group_label(ts, keys)
        w = d.textlength(text, font=font)
        x = min(max(px - w / 2, left + 4), right - 4 - w)
        d.text((x, top + 20), text, fill="#444444", font=font)


def _sign(mode: str) -> int:
    return 1 if mode == "max" else -1


def _label_front(d: Any, front: Sequence[dict[str, Any]], keys: Sequence[str], best: str | None,
                 sx: Callable[[float], float], sy: Callable[[float], float], box: Box) -> None:
    """Each Pareto point's label (trials at the same point share one), right of it or, near the right
    edge, left of it; moved down past any label already placed."""
    font = _font(13)
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for t in front:
        groups.setdefault((sx(_predicted(t) / GiB), sy(t["best_metric"])), []).append(t)  # type: ignore[operator]
    placed: list[tuple[float, float, float, float]] = []
    for (px, py), ts in groups.items():
        text = group_label(ts, keys) + f"  {ts[0]['best_metric']:.4f}" + (" (best)" if any(t["trial"] == best for t in ts) else "")
        w = d.textlength(text, font=font)
        x = px + 10 if px + 10 + w < box[2] - 4 else px - 10 - w
        y = py - 20 if py - 20 > box[1] + 2 else py + 8  # above the point, or below it at the top of the frame
        while any(x < b[2] and x + w > b[0] and y < b[3] and y + 15 > b[1] for b in placed) and y < box[3]:
            y += 16
        placed.append((x, y, x + w, y + 15))
        d.text((x, y), text, fill=FRONT, font=font)


def _frontier_key(d: Any, at: Point, budget: bool) -> None:
    x, y = at
    font = _font(13)
    entries: list[tuple[Callable[[Point], None], str]] = [
        (lambda p: marker(d, p, "circle", FRONT, 6), "Pareto-optimal (labelled)"),
        (lambda p: d.line([(p[0] - 12, p[1]), (p[0] + 12, p[1])], fill=FRONT, width=2), "frontier: best within a memory"),
        (lambda p: marker(d, p, "circle", OTHER, 4), "dominated trial"),
        (lambda p: marker(d, p, "x", FAILED, 5), "failed"),
        (lambda p: marker(d, p, "circle", OTHER, 5, hollow=True), "no metric, in the strip below"),
        (lambda p: None, "(skipped: predicted not to fit)"),
        (lambda p: d.ellipse((p[0] - 9, p[1] - 9, p[0] + 9, p[1] + 9), outline="black", width=2), "the best trial"),
    ]
    if budget:
        entries.append((lambda p: polyline(d, [(p[0] - 12, p[1]), (p[0] + 12, p[1])], FAILED, 2, dashed=True), "memory budget"))
    d.text((x, y + 4), "key", fill="black", font=_font(15), anchor="ls")
    y += 22
    for draw, text in entries:
        draw((x + 14, y))
        d.text((x + 34, y), text, fill="black", font=font, anchor="lm")
        y += 22
