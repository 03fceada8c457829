"""Geometry of the report's chart (accuracy vs. latency vs. size): axes, bubbles, labels and legend.

Computed here in pixels, drawn by the `chart` macro in `report_templates/macros.html`: the arithmetic is
testable Python, the markup stays in the template.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from builder.pages import MISSING, as_mapping, fmt_bytes, fmt_ms, is_fraction_metric, number, plain_metric

__all__ = ["Chart", "ChartSection", "chart_section", "target_latency"]

WIDTH, HEIGHT = 860, 440
LEFT, RIGHT, TOP, BOTTOM = 78, WIDTH - 190, 34, HEIGHT - 64
R_MAX, R_MIN, R_UNKNOWN = 26.0, 4.0, 6.0
# Fill and stroke by gate status; the selected variant gets a blue ring instead of its stroke.
_COLOURS = {"pass": ("#2f9e44", "#2b8a3e"), "fail": ("#e03131", "#c92a2a"), "unknown": ("#868e96", "#495057")}
_SELECTED_STROKE = "#3b5bdb"


@dataclasses.dataclass(frozen=True)
class Tick:
    px: float
    label: str


@dataclasses.dataclass(frozen=True)
class Bubble:
    name: str
    title: str
    cx: float
    cy: float
    r: float
    status: str  # pass | fail | unknown
    selected: bool
    sized: bool

    @property
    def classes(self) -> str:
        return f"point {self.status}" + (" selected" if self.selected else "") + ("" if self.sized else " nosize")

    @property
    def fill(self) -> str:
        return _COLOURS[self.status][0]

    @property
    def stroke(self) -> str:
        return _SELECTED_STROKE if self.selected else _COLOURS[self.status][1]


@dataclasses.dataclass(frozen=True)
class Label:
    text: str
    x: float
    y: float
    anchor: str
    selected: bool


@dataclasses.dataclass(frozen=True)
class LegendBubble:
    cx: float
    cy: float
    r: float
    label_y: float
    label: str


@dataclasses.dataclass(frozen=True)
class LegendKey:
    label: str
    fill: str
    stroke: str
    width: float
    y: float


@dataclasses.dataclass(frozen=True)
class Chart:
    """Everything the template draws, in SVG user units (the viewBox is WIDTH × HEIGHT)."""

    x_label: str
    y_label: str
    log_x: bool
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    bubbles: tuple[Bubble, ...]  # in drawing order
    labels: tuple[Label, ...]
    legend_x: float
    legend_bubbles: tuple[LegendBubble, ...]  # empty when no size is known
    legend_keys: tuple[LegendKey, ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    top: int = TOP
    bottom: int = BOTTOM

    @property
    def x_title(self) -> str:
        return f"{self.x_label} (ms{', log scale' if self.log_x else ''})"

    @property
    def mid_x(self) -> float:
        return (self.left + self.right) / 2

    @property
    def mid_y(self) -> float:
        return (self.top + self.bottom) / 2


@dataclasses.dataclass(frozen=True)
class ChartSection:
    """What the chart section shows: the chart, or why there is none, and the variants left out."""

    chart: Chart | None
    y_label: str
    not_plotted: tuple[str, ...]


def target_latency(variant: Mapping[str, Any]) -> tuple[float | None, bool]:
    """The target latency and whether it is an estimate."""
    measured = number(variant.get("target_latency_ms"))
    if measured is not None:
        return measured, variant.get("target_latency_source") == "estimate"
    estimate = number(variant.get("estimated_target_latency_ms"))
    return estimate, estimate is not None


def chart_section(variants: list[Mapping[str, Any]], selected: Any, metric: Any) -> ChartSection:
    x_of, x_label = _pick_x(variants)
    y_of, y_label, y_percent = _pick_y(variants, metric)
    points: list[_Point] = []
    not_plotted: list[str] = []
    for variant in variants:
        name = str(variant.get("name") if variant.get("name") is not None else MISSING)
        x, y = x_of(variant), y_of(variant)
        if x is None or y is None:
            missing = " and ".join(what for what, v in (("latency", x), (y_label, y)) if v is None)
            not_plotted.append(f"{name} (no {missing})")
            continue
        size = number(variant.get("size_bytes"))
        title = f"{name}: {y_label} {plain_metric(y, y_percent)}, {x_label} {fmt_ms(x)} ms, size {fmt_bytes(size)}"
        points.append(_Point(name, x, y, size if size is not None and size > 0 else None, variant.get("passed"),
                             selected is not None and variant.get("name") == selected, title))
    chart = _chart(points, x_label, y_label, y_percent) if points else None
    return ChartSection(chart, y_label, tuple(not_plotted))


# ---------------------------------------------------------------------------------------------------
# Axes


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Maps data values to pixels, linearly or on a log scale, and knows its tick values."""

    lo: float
    hi: float
    log: bool
    px_lo: float
    px_hi: float
    ticks: tuple[float, ...]
    step: float | None  # linear tick step, used to pick label decimals

    def __call__(self, value: float) -> float:
        f = math.log10 if self.log else (lambda v: v)
        span = f(self.hi) - f(self.lo)
        t = (f(value) - f(self.lo)) / span if span else 0.5
        return self.px_lo + t * (self.px_hi - self.px_lo)


def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = span / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * magnitude:
            return multiple * magnitude
    return 10 * magnitude


def _make_axis(values: list[float], px_lo: float, px_hi: float, *, allow_log: bool, ceiling_one: bool) -> _Axis:
    lo, hi = min(values), max(values)
    if allow_log and lo > 0 and hi / lo > 10:
        factor = (hi / lo) ** 0.08
        lo_d, hi_d = lo / factor, hi * factor
        first, last = math.floor(math.log10(lo_d)), math.ceil(math.log10(hi_d))
        multiples = (1, 2, 5) if last - first <= 4 else (1,)
        ticks = tuple(
            m * 10.0**d for d in range(first, last + 1) for m in multiples if lo_d <= m * 10.0**d <= hi_d
        )
        return _Axis(lo_d, hi_d, True, px_lo, px_hi, ticks, None)
    span = hi - lo
    if span <= abs(hi) * 1e-9:  # identical values: open a window around them instead of dividing by zero
        pad = abs(lo) * 0.1 or 1.0
    else:
        pad = span * 0.12
    lo_d, hi_d = lo - pad, hi + pad
    step = _nice_step(hi_d - lo_d)
    lo_d, hi_d = math.floor(lo_d / step) * step, math.ceil(hi_d / step) * step
    if lo >= 0:
        lo_d = max(lo_d, 0.0)
    if ceiling_one and hi <= 1:
        hi_d = min(hi_d, 1.0)
    first, last = math.ceil(lo_d / step - 1e-9), math.floor(hi_d / step + 1e-9)
    ticks = tuple(round(k * step, 12) for k in range(first, last + 1))
    return _Axis(lo_d, hi_d, False, px_lo, px_hi, ticks, step)


def _tick_label(value: float, axis: _Axis, percent: bool) -> str:
    if percent:
        value *= 100
    if axis.step is not None:
        step = axis.step * (100 if percent else 1)
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if round(step / 10.0 ** math.floor(math.log10(step) + 1e-9), 6) == 2.5:
            decimals += 1
    else:
        decimals = max(0, -math.floor(math.log10(abs(value)) + 1e-9)) if value else 0
    text = f"{value:,.{decimals}f}"
    return text + ("%" if percent else "")


def _ticks(axis: _Axis, percent: bool) -> tuple[Tick, ...]:
    return tuple(Tick(axis(value), _tick_label(value, axis, percent)) for value in axis.ticks)


# ---------------------------------------------------------------------------------------------------
# Points


@dataclasses.dataclass(frozen=True)
class _Point:
    name: str
    x: float
    y: float
    size: float | None
    passed: Any
    selected: bool
    title: str


def _pick_x(variants: list[Mapping[str, Any]]) -> tuple[Callable[[Mapping[str, Any]], float | None], str]:
    def target(v: Mapping[str, Any]) -> float | None:
        value, _ = target_latency(v)
        return value if value is not None and value >= 0 else None

    def host_p50(v: Mapping[str, Any]) -> float | None:
        value = number(as_mapping(v.get("latency_ms")).get("p50"))
        return value if value is not None and value >= 0 else None

    if any(target(v) is not None for v in variants):
        estimated = any(target_latency(v)[1] for v in variants)
        return target, "estimated target latency" if estimated else "target latency"
    return host_p50, "host p50 latency"


def _pick_y(variants: list[Mapping[str, Any]], metric: Any) -> tuple[Callable[[Mapping[str, Any]], float | None], str, bool]:
    if any(number(v.get("accuracy")) is not None for v in variants):
        label = f"accuracy ({metric})" if metric else "accuracy"
        return (lambda v: number(v.get("accuracy"))), label, is_fraction_metric(metric)
    return (lambda v: number(v.get("agreement"))), "agreement with reference", True


def _chart(points: list[_Point], x_label: str, y_label: str, y_percent: bool) -> Chart:
    xs = [p.x for p in points]
    ys = [p.y for p in points]
    inset = R_MAX + 2  # keeps a bubble on a clamped domain edge (0 ms, 100 %) inside the plot
    x_axis = _make_axis(xs, LEFT + inset, RIGHT - inset, allow_log=min(xs) > 0, ceiling_one=False)
    y_axis = _make_axis(ys, BOTTOM - inset, TOP + inset, allow_log=False, ceiling_one=y_percent)
    max_size = max((p.size for p in points if p.size is not None), default=None)

    def radius(p: _Point) -> float:
        if p.size is None or max_size is None:
            return R_UNKNOWN
        return max(R_MIN, R_MAX * math.sqrt(p.size / max_size))  # area, not radius, grows with size

    bubbles = [
        Bubble(p.name, p.title, x_axis(p.x), y_axis(p.y), radius(p),
               "pass" if p.passed is True else ("fail" if p.passed is False else "unknown"), p.selected, p.size is not None)
        for p in points
    ]
    # Big bubbles first so small ones stay visible on top; the selected one last.
    bubbles.sort(key=lambda b: (b.selected, -b.r))
    legend_x = RIGHT + 22
    legend_bubbles, keys_y = _legend_bubbles(max_size)
    return Chart(x_label, y_label, x_axis.log, _ticks(x_axis, False), _ticks(y_axis, y_percent), tuple(bubbles),
                 _labels(bubbles), legend_x, legend_bubbles, _legend_keys(keys_y))


def _labels(bubbles: list[Bubble]) -> tuple[Label, ...]:
    """One label per bubble, at the first side (right, left, above, below) that overlaps nothing."""
    char_w, text_h = 7.0, 14.0
    taken: list[tuple[float, float, float, float]] = [(b.cx - b.r, b.cy - b.r, b.cx + b.r, b.cy + b.r) for b in bubbles]
    labels = []
    for index, b in enumerate(bubbles):
        text = ("★ " if b.selected else "") + b.name
        w = char_w * len(text)
        cx, cy, r = b.cx, b.cy, b.r
        candidates = [
            (cx + r + 5, cy + 4, "start", (cx + r + 5, cy - text_h / 2, cx + r + 5 + w, cy + text_h / 2)),
            (cx - r - 5, cy + 4, "end", (cx - r - 5 - w, cy - text_h / 2, cx - r - 5, cy + text_h / 2)),
            (cx, cy - r - 6, "middle", (cx - w / 2, cy - r - 6 - text_h, cx + w / 2, cy - r - 6)),
            (cx, cy + r + 15, "middle", (cx - w / 2, cy + r + 2, cx + w / 2, cy + r + 2 + text_h)),
        ]
        others = taken[:index] + taken[index + 1:]

        def fits(box: tuple[float, float, float, float]) -> bool:
            inside = box[0] >= LEFT + 2 and box[2] <= RIGHT + 10 and box[1] >= TOP - 30 and box[3] <= BOTTOM - 2
            return inside and not any(_overlaps(box, other) for other in others)

        fallback = candidates[0] if cx < (LEFT + RIGHT) / 2 else candidates[1]
        x, y, anchor, box = next((c for c in candidates if fits(c[3])), fallback)
        taken.append(box)
        labels.append(Label(text, x, y, anchor, b.selected))
    return tuple(labels)


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _legend_bubbles(max_size: float | None) -> tuple[tuple[LegendBubble, ...], float]:
    """The two size bubbles of the legend (full and quarter area) and the y where the colour keys start."""
    if max_size is None:
        return (), 50
    cy = 20 + R_MAX
    bubbles = []
    for fraction, cx in ((1.0, R_MAX + 2), (0.25, 2 * R_MAX + 44)):
        r = R_MAX * math.sqrt(fraction)
        bubbles.append(LegendBubble(cx, cy + R_MAX - r, r, cy + R_MAX + 16, fmt_bytes(max_size * fraction)))
    return tuple(bubbles), 20 + 2 * R_MAX + 40


def _legend_keys(y: float) -> tuple[LegendKey, ...]:
    entries = (("passed gates", *_COLOURS["pass"], 1.5), ("failed a gate", *_COLOURS["fail"], 1.5),
               ("selected", "none", _SELECTED_STROKE, 3.5))
    return tuple(LegendKey(label, fill, stroke, width, y + 22 * index) for index, (label, fill, stroke, width) in enumerate(entries))
