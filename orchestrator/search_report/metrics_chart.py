"""metrics.png: every trial's eval metric over optimizer steps, one line per trial, labelled in the legend
with its hyperparameters and how it ended (plot)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.run_report import _font, polyline, save_png
from orchestrator.search_report.draw import (
    FAILED,
    GREY,
    LEFT,
    TOP,
    Box,
    Point,
    chart,
    marker,
    measure,
    style,
    ticks,
    wrapped,
    x_axis,
    y_ticks,
)
from orchestrator.search_report.labels import key_legend, ranked, status_mark, trial_labels

LEGEND_ALL = 40  # up to this many trials the legend lists every one; beyond, the best LEGEND_TOP
LEGEND_TOP = 20
ROW = 20  # a legend row's height
PLOT_W, PLOT_H = 720, 420  # the frame's size (it grows taller with the legend)


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
    legend_w = int(min(max([measure().textlength(s, font=font) for s in texts.values()] + [200]) + 50, 560))
    rows = 1 + len(listed) + (1 if more else 0)
    left, top = LEFT, TOP
    right, bottom = left + PLOT_W, top + max(PLOT_H, rows * ROW + 10)
    width = right + 30 + legend_w + 16
    curves = [t for t in trials if t["curve"]]
    fraction = offset_fraction(len(curves))
    notes = _metrics_notes(summary, fraction, more)
    note_lines = wrapped(notes, _font(13), width - 40)
    height = bottom + 56 + 17 * len(note_lines) + 12
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    totals = [t["total_steps"] or 0 for t in trials]
    x1 = float(max([s for t in curves for s, _ in t["curve"]] + totals + [1]))
    xt = ticks(0.0, x1, inside=True, integer=True)
    values = [v for t in curves for _, v in t["curve"]]
    yt = y_ticks(values)
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
