"""frontier.png: each trial's best metric against its predicted memory per worker, the Pareto frontier
as a step line, trials without a metric in a strip under the axes, the memory budget dashed (plot_frontier)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.run_report import _font, polyline, save_png
from orchestrator.search_report.draw import (
    FAILED,
    LEFT,
    TOP,
    Box,
    Point,
    chart,
    marker,
    ticks,
    wrapped,
    x_axis,
    y_ticks,
)
from orchestrator.search_report.frontier import memory_device, memory_unit, pareto
from orchestrator.search_report.labels import group_label, override_keys
from orchestrator.search_report.memory import GiB, gib, predicted

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
    placed = [t for t in trials if predicted(t) is not None]
    scored = [t for t in placed if t["best_metric"] is not None and t["status"] != "skipped"]
    unscored = [t for t in placed if t not in scored]
    per = memory_unit(memory_device(trials))
    notes = [f"x: the planner's predicted memory per {per} for each trial's job (what a memory budget is checked against); "
             "measured peaks are in frontier.md. Pareto-optimal: no other trial has at most as much memory and a metric at least as good, "
             "strictly better in one; the step line is the best metric reachable within a memory."]
    if len(placed) < len(trials):
        notes.append(f"{len(trials) - len(placed)} trial(s) without a prediction (the planner could not read the model) are not drawn.")
    note_lines = wrapped(notes, _font(13), 1100 - 40)
    left, top, right, bottom = LEFT, TOP, LEFT + 760, TOP + 420
    strip = (bottom + 10, bottom + 46)
    width, height = 1100, strip[1] + 60 + 17 * len(note_lines) + 12
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    xs = [predicted(t) / GiB for t in placed] + ([budget / GiB] if budget else [])  # type: ignore[operator]
    xt = ticks(min(xs, default=0.0), max(xs, default=1.0))
    yt = y_ticks([t["best_metric"] for t in scored])
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
        d.text((bx - 4, top + 6), f"budget {gib(budget)} GiB", fill=FAILED, font=_font(13), anchor="rt")
    front = sorted((t for t in trials if t["trial"] in set(optimal)), key=lambda t: (predicted(t), -_sign(mode) * t["best_metric"]))
    pts = [(sx(predicted(t) / GiB), sy(t["best_metric"])) for t in front]  # type: ignore[operator]
    stairs = [p for a, b in zip(pts, pts[1:], strict=False) for p in (a, (b[0], a[1]))] + pts[-1:]
    if pts:
        stairs.append((right - 8, pts[-1][1]))  # the best metric stays reachable with more memory
        d.line(stairs, fill=FRONT, width=2)
    for t in scored:
        p = (sx(predicted(t) / GiB), sy(t["best_metric"]))  # type: ignore[operator]
        if t["status"] == "failed":
            marker(d, p, "x", FAILED, 5)
        elif t["trial"] not in optimal:
            marker(d, p, "circle", OTHER, 4)
    for t in front:
        p = (sx(predicted(t) / GiB), sy(t["best_metric"]))  # type: ignore[operator]
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
        groups.setdefault(round(sx(predicted(t) / GiB)), []).append(t)  # type: ignore[operator]
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
        groups.setdefault((sx(predicted(t) / GiB), sy(t["best_metric"])), []).append(t)  # type: ignore[operator]
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
