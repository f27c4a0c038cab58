"""A run's report (`rayft report RUN_DIR`, and the end of every `rayft train`): RUN_DIR/report.png, a panel per
metric against optimizer steps with one colour per attempt (steps an attempt ran again after its predecessor
died overlap instead of zigzagging back), and RUN_DIR/report.md: config, final metrics, parity, timings,
attempts and sample generations. A run without a manifest (failed, interrupted) is reported from metrics.jsonl.

Also the PIL drawing helpers the search report shares (no plotting dependency).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jobs import attempts as attempts_mod
from jobs.metrics_log import metrics_path, read_metrics
from orchestrator import dotted

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


# ---- drawing helpers (shared with orchestrator.search_report) -----------------------------------------


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


def save_png(img: Any, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def is_run_dir(directory: Path) -> bool:
    return (directory / "job.yaml").is_file() and metrics_path(directory).is_file()


# ---- the run's report: RUN_DIR/report.png and RUN_DIR/report.md --------------------------------------

PNG, MD = "report.png", "report.md"
# (record key, panel title, y axis): one panel each, against optimizer steps; the sixth cell holds the legend
PANELS = (
    ("train_loss", "train loss", "data"),
    ("eval_loss", "eval loss", "data"),
    ("eval_accuracy", "eval accuracy", "fraction"),
    ("lr", "learning rate", "zero"),
    ("tokens_per_s", "tokens/s", "zero"),
)
SIZE = (1200, 1000)
HEADER_H, COLS, ROWS = 56, 2, 3
MARGIN = (78, 40, 22, 48)  # a cell's plot box inset: left (y tick labels), top (title), right, bottom (x ticks, label)


def panel_boxes(size: tuple[int, int] = SIZE) -> dict[str, Box]:
    """Each panel's plot box (and "legend": the sixth cell), in pixels of report.png."""
    cell_w, cell_h = size[0] // COLS, (size[1] - HEADER_H) // ROWS
    names = [key for key, _, _ in PANELS] + ["legend"]
    out = {}
    for i, name in enumerate(names):
        x, y = (i % COLS) * cell_w, HEADER_H + (i // COLS) * cell_h
        inset_left, inset_bottom = (20, 10) if name == "legend" else (MARGIN[0], MARGIN[3])
        out[name] = (x + inset_left, y + MARGIN[1], x + cell_w - MARGIN[2], y + cell_h - inset_bottom)
    return out


def series(records: list[dict[str, Any]], key: str) -> list[Point]:
    """(step, value) of one attempt's train/eval records (older ones have no event) that carry key, one per step (the last)."""
    by_step = {int(r["step"]): float(r[key]) for r in records if r.get("event", "train") in ("train", "eval") and r.get(key) is not None and "step" in r}
    return sorted(by_step.items())


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart) covering lo..hi; the first and last enclose them."""
    import math

    if not hi > lo:
        lo, hi = (lo - 0.5, hi + 0.5) if lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_label(v: float, step: float, percent: bool = False, top: float = 0.0) -> str:
    """One tick's label; step: the ticks' spacing; top: the largest |tick| (from 10 000 on, every tick in k)."""
    if percent:
        return f"{v * 100:.0f}%"
    if abs(v) < step * 1e-6:
        return "0"
    if top >= 10_000:
        return f"{v / 1000:.{_decimals(step / 1000)}f}k"
    if step < 1e-3 and top < 1e-2:  # 5e-5, 1.5e-4 (small values; 1.005 GiB keeps its decimals)
        mantissa, exponent = f"{v:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:.{_decimals(step)}f}"


def _decimals(step: float) -> int:
    return next((d for d in range(7) if abs(round(step, d) - step) < step * 1e-6), 6)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def axes(d: Any, box: Box, x: tuple[float, float], y: tuple[float, float], title: str, percent: bool = False) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """A panel: grid lines at round ticks with their labels, a frame, a title and the x label; returns the
    step -> pixel and value -> pixel maps."""
    left, top, right, bottom = box
    yt = nice_ticks(*y, n=5)  # the y axis spans its outer ticks; the x axis exactly the steps, ticks inside
    (x0, x1), (y0, y1) = x, (yt[0], yt[-1])
    xt = [s for s in nice_ticks(x0, x1, n=6) if x0 - 1e-9 <= s <= x1 + 1e-9]
    pad = 5  # values at the range's ends (a flat lr, 100% accuracy) stay off the frame
    sx = lambda s: left + pad + (s - x0) / max(x1 - x0, 1e-9) * (right - left - 2 * pad)  # noqa: E731
    sy = lambda v: bottom - pad - (v - y0) / (y1 - y0) * (bottom - top - 2 * pad)  # noqa: E731
    small = _font(13)
    for v in yt:
        py = sy(v)
        d.line([(left, py), (right, py)], fill="#e4e4e4")
        d.text((left - 6, py), tick_label(v, yt[1] - yt[0], percent, max(abs(yt[0]), abs(yt[-1]))), fill="black", font=small, anchor="rm")
    for s in xt:
        px = sx(s)
        d.line([(px, top), (px, bottom)], fill="#e4e4e4")
        d.line([(px, bottom), (px, bottom + 4)], fill="black")
        d.text((px, bottom + 6), tick_label(s, xt[1] - xt[0] if len(xt) > 1 else 1.0, top=max(abs(xt[0]), abs(xt[-1]))), fill="black", font=small, anchor="mt")
    d.rectangle((left, top, right, bottom), outline="black")
    d.text((left, top - 10), title, fill="black", font=_font(16), anchor="ls")
    d.text(((left + right) / 2, bottom + 26), "optimizer step", fill="#444444", font=small, anchor="mt")
    return sx, sy


def filled_markers(d: Any, pts: Sequence[Point], colour: str, radius: int = 3, square: bool = False) -> None:
    for px, py in pts:
        shape = d.rectangle if square else d.ellipse
        shape((px - radius, py - radius, px + radius, py + radius), fill=colour)


def _wrap(d: Any, text: str, font: Any, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and d.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def plot_run(by_attempt: dict[int, list[dict[str, Any]]], table: list[dict[str, Any]], path: Path, header: str, notes: list[str]) -> None:
    """report.png: one panel per metric against optimizer steps, one colour per attempt (each attempt's
    segment its own line, so steps run again after a restart overlap instead of zigzagging back), and a
    legend naming each attempt's steps and how it ended; notes (the final numbers) under it."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    d.text((20, HEADER_H / 2), header, fill="black", font=_font(20), anchor="lm")
    colour = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(by_attempt))}
    boxes = panel_boxes()
    data = {key: {n: series(rs, key) for n, rs in by_attempt.items()} for key, _, _ in PANELS}
    generated = {n: series(rs, "eval_generated_accuracy") for n, rs in by_attempt.items()}
    has_generated = any(generated.values())
    steps = [s for per in (*data.values(), generated) for pts in per.values() for s, _ in pts]
    total = max((int(r["total_steps"]) for rs in by_attempt.values() for r in rs if r.get("total_steps")), default=0)
    x = (0.0, float(max([*steps, total, 1])))
    for key, title, scale in PANELS:
        per = data[key]
        values = [v for pts in per.values() for _, v in pts] + ([v for pts in generated.values() for _, v in pts] if key == "eval_accuracy" else [])
        if scale == "fraction":
            y = (0.0, 1.0)
        elif scale == "zero":
            y = (0.0, max(values, default=1.0) or 1.0)
        else:
            y = (min(values, default=0.0), max(values, default=1.0))
        if key == "eval_accuracy" and has_generated:
            title += "  (solid: teacher-forced, dashed: generated)"
        sx, sy = axes(d, boxes[key], x, y, title, percent=scale == "fraction")
        if not values:
            left, top, right, bottom = boxes[key]
            d.text(((left + right) / 2, (top + bottom) / 2), "not recorded", fill="#888888", font=_font(15), anchor="mm")
        for n in sorted(by_attempt):
            pts = [(sx(s), sy(v)) for s, v in per[n]]
            if len(pts) > 1:
                d.line(pts, fill=colour[n], width=3, joint="curve")
            if key in ("eval_loss", "eval_accuracy") or len(pts) == 1:
                filled_markers(d, pts, colour[n])
            if key == "eval_accuracy" and generated[n]:
                gen = [(sx(s), sy(v)) for s, v in generated[n]]
                polyline(d, gen, colour[n], 2, dashed=True)
                filled_markers(d, gen, colour[n], square=True)
    _legend(d, boxes["legend"], by_attempt, table, colour, notes)
    save_png(img, path)


def _legend(d: Any, box: Box, by_attempt: dict[int, list[dict[str, Any]]], table: list[dict[str, Any]], colour: dict[int, str], notes: list[str]) -> None:
    left, top, right, bottom = box
    font, bold = _font(14), _font(16)
    d.text((left, top - 10), "attempts (one colour each)", fill="black", font=bold, anchor="ls")
    info = {a["attempt"]: a for a in table}
    y = top + 4
    shown = sorted(by_attempt)
    for n in shown[:6]:
        a = info.get(n)
        text = f"attempt {n}: steps {a['from_step']}-{a['to_step']}, {a['reason']}" if a else f"attempt {n}"
        d.line([(left, y + 8), (left + 24, y + 8)], fill=colour[n], width=3)
        for line in _wrap(d, text, font, right - left - 32)[:3]:
            d.text((left + 32, y), line, fill="black", font=font)
            y += 18
        y += 4
    if len(shown) > 6:
        d.text((left + 32, y), f"... and {len(shown) - 6} more (see report.md)", fill="black", font=font)
        y += 22
    if not shown:
        d.text((left, y), "no records in metrics.jsonl", fill="black", font=font)
        y += 22
    y += 10
    for note in notes:
        for line in _wrap(d, note, font, right - left):
            if y > bottom - 18:
                return
            d.text((left, y), line, fill="black", font=font)
            y += 18


# ---- report.md ----------------------------------------------------------------------------------------

SAMPLES = 5  # sample generations shown per model


def cell(value: Any) -> str:
    """A markdown table cell: HTML-escaped (a prompt's <image> must not vanish), | escaped, newlines as <br>."""
    text = "" if value is None else str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _pct(v: Any) -> str:
    return "—" if v is None else f"{v:.1%}"


def _fixed(v: Any, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def job_of(run_dir: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The resolved config: the manifest's, else job.yaml's."""
    from orchestrator.config import ConfigError, load_raw

    if manifest and isinstance(manifest.get("job"), dict):
        return manifest["job"]
    try:
        return load_raw(run_dir / "job.yaml")
    except ConfigError:
        return {}


def config_rows(job: dict[str, Any]) -> list[tuple[str, Any]]:
    method = dotted.get(job, "method")
    quant = dotted.get(job, "quantization.type")
    quantization = "none" if quant in (None, "none") else quant + (", double quant" if dotted.get(job, "quantization.double_quant") else "")
    lora = f"rank {dotted.get(job, 'lora.rank')}, alpha {dotted.get(job, 'lora.alpha')}" if method in ("lora", "qlora") else "— (not a LoRA run)"
    ds = dotted.get(job, "deepspeed")
    deepspeed = "off"
    if isinstance(ds, dict):
        offload = [f"{k.removeprefix('offload_')} offload" for k in ("offload_optimizer", "offload_params") if ds.get(k) not in (None, "none")]
        deepspeed = f"ZeRO stage {ds.get('stage')}" + (f" ({', '.join(offload)})" if offload else "")
    epochs = dotted.get(job, "train.epochs")
    max_steps = dotted.get(job, "train.max_steps")
    return [
        ("name", dotted.get(job, "name")), ("model", dotted.get(job, "model")), ("method", method), ("precision", dotted.get(job, "precision")),
        ("quantization", quantization), ("lora", lora), ("lr", dotted.get(job, "train.lr")),
        ("epochs", f"{epochs} (max_steps {max_steps})" if max_steps else epochs), ("workers", dotted.get(job, "scaling.workers")),
        ("deepspeed", deepspeed),
    ]


def final_metrics(manifest: dict[str, Any] | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's metrics (at the exported checkpoint); without one, the last recorded values."""
    if manifest and isinstance(manifest.get("metrics"), dict):
        return manifest["metrics"]
    evals = [r for r in with_attempts(records) if r.get("event") == "eval"]
    trains = [r for r in records if r.get("event") in ("train", "eval") and "train_loss" in r]
    last = evals[-1] if evals else {}
    speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    return {
        "step": max((r["step"] for r in records if "step" in r), default=None),
        "eval_accuracy": last.get("eval_accuracy"), "eval_loss": last.get("eval_loss"),
        "eval_generated_accuracy": last.get("eval_generated_accuracy"),
        "train_loss": trains[-1]["train_loss"] if trains else None,
        "initial_eval_accuracy": evals[0].get("eval_accuracy") if evals and evals[0].get("step") == 0 else None,
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
    }


def metric_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("step", m.get("step")), ("eval accuracy (teacher-forced)", _pct(m.get("eval_accuracy")))]
    if m.get("eval_generated_accuracy") is not None:
        rows.append(("eval accuracy (generated)", _pct(m["eval_generated_accuracy"])))
    rows += [("eval accuracy before training (step 0)", _pct(m.get("initial_eval_accuracy"))), ("eval loss", _fixed(m.get("eval_loss"))),
             ("train loss", _fixed(m.get("train_loss"))),
             ("tokens/s (median over steps)", "—" if m.get("tokens_per_s") is None else f"{m['tokens_per_s']:,.0f}")]
    return rows


def check_line(check: dict[str, Any]) -> str:
    from jobs.merge import describe

    try:
        return describe(check).removeprefix(f"{check['name']}: ")
    except (KeyError, TypeError, ValueError, IndexError):  # a check of another rayft version: its verdict alone
        return check.get("reason") or ("passed" if check.get("passed") else "FAILED")


def parity_lines(parity: dict[str, Any]) -> list[str]:
    passed = {True: "yes", False: "**no**"}.get(parity.get("passed"), "—")
    lines = [f"- passed: {passed}", f"- merge: {parity.get('merge') or '—'}", f"- export dtype: {parity.get('export_dtype') or '—'}",
             f"- merged model's accuracy: {_pct(parity.get('merged_accuracy'))}", ""]
    checks = parity.get("checks")
    if not isinstance(checks, dict):
        return [*lines, "(this manifest lists no separate checks)"]
    rows = [(name, "yes" if c.get("ran") else "no", check_line({"name": name, **c})) for name, c in checks.items()]
    return lines + md_table(["check", "ran", "result (or why not run)"], rows)


def generation_lines(gen: dict[str, Any]) -> list[str]:
    lines = [f"Greedy decoding, at most {gen.get('max_new_tokens', '?')} new tokens; up to {SAMPLES} samples per model."]
    for which, label in (("trained", "As trained"), ("merged", "Merged model")):
        g = gen.get(which)
        if not isinstance(g, dict):
            continue
        if g.get("ran") is False:
            lines += ["", f"**{label}**: not run ({g.get('reason', 'no reason recorded')})"]
            continue
        step = f" (step {g['step']})" if g.get("step") is not None else ""
        lines += ["", f"**{label}**{step}: generated accuracy {_pct(g.get('accuracy'))}", ""]
        samples = g.get("samples") or []
        rows = [(s.get("prompt"), s.get("expected"), s.get("generated"), "yes" if s.get("correct") else "no") for s in samples[:SAMPLES]]
        lines += md_table(["prompt", "expected", "generated", "correct"], rows) if rows else ["(no samples recorded)"]
    return lines


def markdown(run_dir: Path, manifest: dict[str, Any] | None, records: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    job = job_of(run_dir, manifest)
    reached = max((r["step"] for r in records if "step" in r), default=0)
    total = max((r["total_steps"] for r in records if r.get("total_steps")), default=None)
    out = [f"# Run report: {dotted.get(job, 'name') or run_dir.name}", "", f"Run directory: `{run_dir}`", ""]
    if manifest:
        out.append(f"Exported: the merged model is at `{manifest.get('model_dir')}` (from checkpoint step {dotted.get(manifest, 'metrics.step')}).")
    else:
        out.append(f"**No export**: this run has no manifest.json (it failed or was interrupted before its export). It reached step "
                   f"{reached}{f' of {total}' if total else ''}; this report is from metrics.jsonl alone. "
                   f"Continue it with `rayft train JOB --resume {run_dir}`.")
    out += ["", f"![train loss, eval loss, eval accuracy, learning rate and tokens/s by optimizer step]({PNG})", "", "## Config", ""]
    out += md_table(["key", "value"], config_rows(job))
    which = "at the exported checkpoint (manifest.json)" if manifest else "the last recorded (metrics.jsonl; nothing exported)"
    out += ["", "## Final metrics", "", f"Values {which}.", ""]
    out += md_table(["metric", "value"], metric_rows(final_metrics(manifest, records)))
    out += ["", "## Parity", ""]
    parity = manifest.get("parity") if manifest else None
    out += parity_lines(parity) if isinstance(parity, dict) else ["No export, so no parity check."]
    timings = manifest.get("timings") if manifest else None
    if isinstance(timings, dict):
        out += ["", "## Timings", ""] + md_table(["span (_s: seconds)", "value"], list(timings.items()))
    out += ["", "## Attempts", ""]
    rows = [(a["attempt"], f"{a['from_step']}-{a['to_step']}", a["wall_s"] if a["wall_s"] is not None else "", a["reason"]) for a in table]
    out += md_table(["attempt", "steps", "wall s", "how it ended"], rows) if rows else ["No attempts recorded (metrics.jsonl has no records)."]
    generation = manifest.get("generation") if manifest else None
    if isinstance(generation, dict):
        out += ["", "## Sample generations", ""] + generation_lines(generation)
    return "\n".join(out) + "\n"


def png_text(run_dir: Path, manifest: dict[str, Any] | None, records: list[dict[str, Any]], attempts: int) -> tuple[str, list[str]]:
    """report.png's header line and the notes under its legend."""
    job = job_of(run_dir, manifest)
    m = final_metrics(manifest, records)
    reached = max((r["step"] for r in records if "step" in r), default=0)
    total = max((r["total_steps"] for r in records if r.get("total_steps")), default=None)
    model = Path(str(dotted.get(job, "model") or "?")).name
    header = (f"{dotted.get(job, 'name') or run_dir.name}  ·  {dotted.get(job, 'method') or '?'} on {model}, {dotted.get(job, 'precision') or '?'}  ·  "
              f"step {reached}{f' of {total}' if total else ''}  ·  {attempts} attempt{'' if attempts == 1 else 's'}")
    notes = []
    if m.get("eval_accuracy") is not None:
        notes.append(f"eval accuracy {_pct(m.get('initial_eval_accuracy'))} at step 0 -> {_pct(m['eval_accuracy'])} at step {m.get('step')}")
    if m.get("eval_generated_accuracy") is not None:
        notes.append(f"generated accuracy {_pct(m['eval_generated_accuracy'])}")
    notes.append(f"eval loss {_fixed(m.get('eval_loss'))}, train loss {_fixed(m.get('train_loss'))}")
    parity = manifest.get("parity") if manifest else None
    if isinstance(parity, dict):
        notes.append(f"exported; parity {'passed' if parity.get('passed') else 'FAILED'}, merged accuracy {_pct(parity.get('merged_accuracy'))}")
    else:
        notes.append("no export: no manifest.json (the run failed or was interrupted)")
    return header, notes


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    """RUN_DIR/report.png and RUN_DIR/report.md, from metrics.jsonl, failures.jsonl and (when the run exported)
    manifest.json; returns their paths (png, md)."""
    records = read_metrics(run_dir)
    manifest = read_manifest(run_dir)
    table = attempt_table(run_dir, records)
    by_attempt = split_by_attempt(records)
    header, notes = png_text(run_dir, manifest, records, len(by_attempt))
    png, md = run_dir / PNG, run_dir / MD
    plot_run(by_attempt, table, png, header, notes)
    md.write_text(markdown(run_dir, manifest, records, table))
    return png, md
