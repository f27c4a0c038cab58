"""Drawing helpers both charts use (PIL, with orchestrator.run_report's): axes and their ticks, markers,
each trial's colour and shape, wrapped notes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.run_report import PALETTE, _font, _wrap, nice_ticks, tick_label

Point = tuple[float, float]
Box = tuple[int, int, int, int]  # left, top, right, bottom
SHAPES = ("circle", "square", "triangle", "diamond", "triangle_down", "pentagon", "hexagon", "plus")  # 8 shapes x 9 colours: 72 distinct
FAILED, GREY = "#d62728", "#c8c8c8"
LEFT, TOP = 90, 70  # the frame's top-left corner, in both charts


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


def measure() -> Any:
    """A drawing surface to measure text on."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def wrapped(notes: Sequence[str], font: Any, width: float) -> list[str]:
    """The notes as lines no wider than width in font."""
    d = measure()
    return [line for note in notes for line in _wrap(d, note, font, width)]


def y_ticks(values: Sequence[float]) -> list[float]:
    """Ticks enclosing the values (0..1 when there are none)."""
    return ticks(min(values, default=0.0), max(values, default=1.0))
