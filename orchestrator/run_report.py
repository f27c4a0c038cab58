"""`rayft report RUN_DIR`: a run's attempts, as a table and as RUN_DIR/metrics.png (one colour per attempt,
so the steps an attempt ran again after its predecessor died show as overlapping curves).

Also the PIL drawing helpers the search report shares (no plotting dependency).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jobs import attempts as attempts_mod
from orchestrator.launch import read_metrics

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

Point = tuple[float, float]
Box = tuple[int, int, int, int]  # left, top, right, bottom


# ---- records -> attempts ----------------------------------------------------------------------------


def with_attempts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with its attempt number: its own "attempt", or (older runs) the k-th start event is
    attempt k and the records after it belong to it. Records before any start count as attempt 1."""
    out, current, starts = [], 1, 0
    for r in records:
        if r.get("event") == "start":
            starts += 1
            current = int(r.get("attempt") or starts)
        elif r.get("attempt") is not None:
            current = int(r["attempt"])
        out.append({**r, "attempt": current})
    return out


def split_by_attempt(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by: dict[int, list[dict[str, Any]]] = {}
    for r in with_attempts(records):
        by.setdefault(r["attempt"], []).append(r)
    return by


def attempt_table(run_dir: Path, records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """jobs.attempts.summary over the run's records (older ones numbered) and its failures.jsonl."""
    records = read_metrics(run_dir) if records is None else records
    return attempts_mod.summary(with_attempts(records), attempts_mod.failures(run_dir))


def render_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no attempts recorded (metrics.jsonl has no records)"
    header = ["attempt", "steps", "wall s", "reason"]
    body = [[str(a["attempt"]), f"{a['from_step']}-{a['to_step']}", "" if a["wall_s"] is None else f"{a['wall_s']}", str(a["reason"])] for a in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in [header, *body]]
    return "\n".join(line.rstrip() for line in lines)


# ---- drawing helpers (shared with orchestrator.search.plot) -----------------------------------------


def span(values: Sequence[float], default: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """min and max of the values, widened a little when flat."""
    if not values:
        return default
    lo, hi = min(values), max(values)
    return (lo - 0.05, hi + 0.05) if hi - lo < 1e-9 else (lo, hi)


def frame(
    d: Any, box: Box, x: tuple[float, float], y: tuple[float, float], title: str
) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """Draw the axes box, its title and its labels; return the step -> pixel and value -> pixel maps."""
    left, top, right, bottom = box
    (x0, x1), (y0, y1) = x, y
    sx = lambda s: left + (s - x0) / max(x1 - x0, 1e-9) * (right - left)  # noqa: E731
    sy = lambda v: bottom - (v - y0) / max(y1 - y0, 1e-9) * (bottom - top)  # noqa: E731
    d.rectangle((left, top, right, bottom), outline="black")
    d.text((left, top - 22), title, fill="black")
    for frac in (0.0, 0.5, 1.0):
        v = y0 + frac * (y1 - y0)
        d.text((left - 55, sy(v) - 6), f"{v:.3f}", fill="black")
    d.text((left, bottom + 8), f"step {_num(x0)}", fill="black")
    d.text((right - 60, bottom + 8), f"step {_num(x1)}", fill="black")
    return sx, sy


def polyline(d: Any, pts: Sequence[Point], colour: str, width: int, dashed: bool = False) -> None:
    for a, b in zip(pts, pts[1:], strict=False):
        if dashed:
            dashed_line(d, a, b, colour, width)
        else:
            d.line([a, b], fill=colour, width=width)


def dashed_line(d: Any, a: Point, b: Point, colour: str, width: int, dash: float = 6.0) -> None:
    (xa, ya), (xb, yb) = a, b
    length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-9)
    n = int(length // dash)
    for k in range(0, n, 2):
        f0, f1 = k * dash / length, min((k + 1) * dash / length, 1.0)
        d.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0), (xa + (xb - xa) * f1, ya + (yb - ya) * f1)], fill=colour, width=width)


def markers(d: Any, pts: Sequence[Point], colour: str, radius: int = 3) -> None:
    for px, py in pts:
        d.ellipse((px - radius, py - radius, px + radius, py + radius), outline=colour, width=2)


def save_png(img: Any, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"


# ---- the run's plot -----------------------------------------------------------------------------------


def plot(by_attempt: dict[int, list[dict[str, Any]]], table: list[dict[str, Any]], path: Path, width: int = 900) -> None:
    """Train loss (lines) and eval loss (circles) over steps, and eval accuracy below when there is any;
    one colour per attempt, legend "attempt N (steps A-B): reason"."""
    from PIL import Image, ImageDraw

    train = {n: [(r["step"], r["train_loss"]) for r in rs if "train_loss" in r and "step" in r] for n, rs in by_attempt.items()}
    evals = {n: [r for r in rs if r.get("event") == "eval" and "step" in r] for n, rs in by_attempt.items()}
    eval_loss = {n: [(r["step"], r["eval_loss"]) for r in es if r.get("eval_loss") is not None] for n, es in evals.items()}
    accuracy = {n: [(r["step"], r["eval_accuracy"]) for r in es if r.get("eval_accuracy") is not None] for n, es in evals.items()}
    has_accuracy = any(accuracy.values())
    info = {a["attempt"]: a for a in table}
    panel_h, legend_h = 260, 16 * max(len(by_attempt), 1) + 16
    height = 40 + panel_h + (50 + panel_h if has_accuracy else 0) + 40 + legend_h
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    steps = [s for series in (train, eval_loss, accuracy) for pts in series.values() for s, _ in pts] or [0, 1]
    x = (min(steps), max(steps) or 1)
    colour = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(by_attempt))}
    left, right = 70, width - 30
    top = 30
    losses = [v for series in (train, eval_loss) for pts in series.values() for _, v in pts]
    sx, sy = frame(d, (left, top, right, top + panel_h), x, span(losses), "loss by step (lines: train, circles: eval; one colour per attempt)")
    for n in sorted(by_attempt):
        polyline(d, [(sx(s), sy(v)) for s, v in train[n]], colour[n], 2)
        markers(d, [(sx(s), sy(v)) for s, v in eval_loss[n]], colour[n])
    bottom = top + panel_h
    if has_accuracy:
        top = bottom + 50
        values = [v for pts in accuracy.values() for _, v in pts]
        sx, sy = frame(d, (left, top, right, top + panel_h), x, span(values), "eval accuracy by step")
        for n in sorted(by_attempt):
            pts = [(sx(s), sy(v)) for s, v in accuracy[n]]
            polyline(d, pts, colour[n], 2)
            markers(d, pts, colour[n])
        bottom = top + panel_h
    y = bottom + 35
    for n in sorted(by_attempt):
        a = info.get(n)
        steps_text = f"steps {a['from_step']}-{a['to_step']}" if a else "steps ?"
        reason = str(a["reason"]) if a else ""
        label = f"attempt {n} ({steps_text}): {reason}"
        if len(label) > 130:
            label = label[:127] + "..."
        d.line([(left, y + 6), (left + 20, y + 6)], fill=colour[n], width=3)
        d.text((left + 25, y), label, fill="black")
        y += 16
    if not by_attempt:
        d.text((left, y), "no records in metrics.jsonl", fill="black")
    save_png(img, path)


def is_run_dir(directory: Path) -> bool:
    return (directory / "job.yaml").is_file() and (directory / "metrics.jsonl").is_file()


def report(run_dir: Path) -> str:
    """Write RUN_DIR/metrics.png; return the table of attempts."""
    records = read_metrics(run_dir)
    table = attempt_table(run_dir, records)
    plot(split_by_attempt(records), table, run_dir / "metrics.png")
    return render_table(table)
