"""Render a build report (the `.report.json` dict) as one self-contained HTML page.

The page carries its CSS and its chart (SVG) inline and needs no JavaScript, web font or CDN, so it
opens offline, as a CI artifact or as a mail attachment. It is written with the standard library only,
so the builder needs no template engine.

Reports come from failed and partial builds too, so any field may be missing, null or of an unexpected
type: such values render as an em dash instead of breaking the page. Every string from the report is
escaped, since names, notes and paths come from user config and model files.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["render_report_html", "write_report_html"]

MISSING = "—"
# Metrics reported as a fraction in [0, 1] where one point is 0.01 (accuracy_delta is in these units).
_FRACTION_METRICS = frozenset({"top1", "top5", "accuracy"})
_SENSITIVITY_TOP_NODES = 10
_GATE_LABELS = {
    "max_accuracy_drop": "Largest accuracy drop vs. reference",
    "max_p95_latency_ms": "Slowest p95 latency on target",
    "max_size_mb": "Largest model size",
    "min_agreement": "Smallest top-1 agreement with reference",
}


def write_report_html(report: dict, path: Path) -> None:
    """Write the rendered page to `path` (UTF-8), creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report_html(report), encoding="utf-8")


def render_report_html(report: dict) -> str:
    """The whole report as one HTML document (a string)."""
    report = _as_dict(report)
    variants = [_as_dict(v) for v in _as_list(report.get("variants"))]
    selected = report.get("selected")
    selected_variant = next((v for v in variants if selected is not None and v.get("name") == selected), None)
    metric = report.get("metric") or next((v.get("metric") for v in variants if v.get("metric")), None)

    sections = [
        _summary_section(report, selected_variant, metric),
        _why_section(report),
        _variants_section(variants, selected, metric),
        _chart_section(variants, selected, metric),
        _quantization_section(variants),
        _sensitivity_section(report, variants),
        _gates_section(report, variants, metric),
        _host_section(report),
        _lineage_section(report),
        _passes_section(report),
    ]
    title = f"{_plain(report.get('name'))} {_plain(report.get('version'))} · {_plain(report.get('profile'))} — edgepack build report"
    return "".join(
        [
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
            '<meta name="color-scheme" content="light dark">\n',
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<div class=\"wrap\">\n",
            _header(report, selected),
            "<main>\n",
            *(s for s in sections if s),
            "</main>\n",
            _footer(report),
            "</div>\n</body>\n</html>\n",
        ]
    )


# ---------------------------------------------------------------------------------------------------
# Sections


def _header(report: dict, selected: Any) -> str:
    gates = _as_dict(report.get("gates"))
    bundle = _as_dict(report.get("bundle"))
    passed = gates.get("passed")
    if passed is True:
        badge = '<span class="badge pass" title="every gate passed">PASS</span>'
    elif passed is False:
        badge = '<span class="badge fail" title="a gate or verification failed">FAIL</span>'
    else:
        badge = '<span class="badge neutral" title="the report has no verdict">NO VERDICT</span>'
    version = report.get("version")
    version_tag = f' <span class="version">v{_e(version)}</span>' if version not in (None, "") else ""
    facts = [
        ("Profile", _text(report.get("profile"))),
        ("Runtime", _text(report.get("runtime"))),
        ("Selected", f'<strong class="selected-name">{_e(selected)}</strong>' if selected not in (None, "") else '<span class="muted">none</span>'),
        ("Metric", _text(report.get("metric"))),
        ("Build time", _fmt_duration(report.get("duration_s"))),
    ]
    description = report.get("profile_description")
    bundle_rows = [
        ("Bundle", _code(bundle.get("path"))),
        ("SHA-256", _code(bundle.get("sha256"))),
        ("Bundle size", _fmt_bytes(bundle.get("size_bytes"))),
    ]
    return "".join(
        [
            '<header class="page-head">\n<div class="title-row">\n',
            f"<h1>{_text(report.get('name'))}{version_tag}</h1>\n{badge}\n</div>\n",
            f'<p class="muted profile-desc">{_e(description)}</p>\n' if description else "",
            '<dl class="facts">\n',
            *(f'<div><dt>{k}</dt><dd>{v}</dd></div>\n' for k, v in facts),
            "</dl>\n",
            '<dl class="facts bundle">\n',
            *(f'<div><dt>{k}</dt><dd>{v}</dd></div>\n' for k, v in bundle_rows),
            "</dl>\n",
            '<nav class="toc"><a href="#why">Why</a> <a href="#variants">Variants</a> <a href="#chart">Chart</a> '
            '<a href="#quantization">Quantization</a> <a href="#gates">Gates</a> <a href="#host">Host</a> '
            '<a href="#lineage">Lineage</a> <a href="#passes">Passes</a></nav>\n',
            "</header>\n",
        ]
    )


def _summary_section(report: dict, variant: dict | None, metric: Any) -> str:
    if variant is None:
        return ""
    reference = _as_dict(report.get("reference"))
    ref_name = reference.get("name") or "reference"
    size_ratio = _number(variant.get("size_ratio"))
    size_sub = f"{_fmt_ratio(size_ratio)} of {_e(ref_name)}" if size_ratio is not None else ""
    value, label = _headline_metric(variant, metric)
    delta = variant.get("accuracy_delta")
    metric_sub = f"{_fmt_delta(delta, metric)} vs. {_e(ref_name)}" if _number(delta) is not None else ""
    target, estimated = _target_latency(variant)
    latency = _latency(variant)
    cards = [
        ("Size", _fmt_bytes(variant.get("size_bytes")), size_sub),
        (label, value, metric_sub),
        ("Target latency" + (" (est.)" if estimated else ""), _with_unit(_fmt_ms(target), "ms"), _source_text(variant)),
        ("Host p95", _with_unit(_fmt_ms(latency.get("p95")), "ms"), f"p50 {_with_unit(_fmt_ms(latency.get('p50')), 'ms')}"),
        ("Fallback nodes", str(len(_as_list(variant.get("fallback_nodes")))), "kept in float"),
    ]
    return "".join(
        [
            f'<section id="summary" aria-label="selected variant at a glance">\n<h2>Selected: {_e(variant.get("name"))}</h2>\n<div class="cards">\n',
            *(
                f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div><div class="s">{s}</div></div>\n'
                for k, v, s in cards
            ),
            "</div>\n</section>\n",
        ]
    )


def _why_section(report: dict) -> str:
    reason = report.get("selection_reason")
    selected = report.get("selected")
    parts = ['<section id="why">\n<h2>Why this variant</h2>\n']
    if selected in (None, ""):
        parts.append('<div class="callout fail"><strong>No variant was selected.</strong> None passed every gate.</div>\n')
    parts.append(f'<p class="reason">{_e(reason)}</p>\n' if reason else '<p class="muted">The report gives no selection reason.</p>\n')
    notes = [n for n in _as_list(report.get("notes")) if n not in (None, "")]
    if notes:
        parts.append("<h3>Notes</h3>\n")
        parts.extend(f'<div class="callout">{_e(note)}</div>\n' for note in notes)
    parts.append("</section>\n")
    return "".join(parts)


def _variants_section(variants: list[dict], selected: Any, metric: Any) -> str:
    parts = ['<section id="variants">\n<h2>Variants</h2>\n']
    if not variants:
        parts.append('<p class="muted">No variants were built.</p>\n</section>\n')
        return "".join(parts)
    delta_unit = " (pt)" if _is_fraction_metric(metric) else ""
    headers = [
        ("Variant", ""), ("Precision", ""), ("Size (kB)", "num"), ("Size ratio", "num"), ("Accuracy", "num"),
        (f"Δ accuracy{delta_unit}", "num"), ("Agreement", "num"), ("Cosine", "num"), ("Max abs err", "num"),
        ("Host p50 (ms)", "num"), ("Host p95 (ms)", "num"), ("Target (ms)", "num"), ("Fallback", "num"),
        ("Sparsity", "num"), ("Gates", ""),
    ]
    parts.append('<div class="table-scroll">\n<table class="variants">\n<thead>\n<tr>')
    parts.extend(f'<th class="{cls}">{_e(label)}</th>' if cls else f"<th>{_e(label)}</th>" for label, cls in headers)
    parts.append("</tr>\n</thead>\n<tbody>\n")
    for variant in variants:
        name = variant.get("name")
        is_selected = selected is not None and name == selected
        row_metric = variant.get("metric") or metric
        latency = _latency(variant)
        target, estimated = _target_latency(variant)
        fallback = _as_list(variant.get("fallback_nodes"))
        name_cell = f'<span class="vname">{_text(name)}</span>'
        if is_selected:
            name_cell += ' <span class="tag selected-marker" title="selected variant">★ selected</span>'
        if variant.get("cached") is True:
            name_cell += ' <span class="tag">cached</span>'
        detail = " · ".join(_e(x) for x in (variant.get("format"), variant.get("runtime")) if x)
        if detail:
            name_cell += f'<div class="muted small">{detail}</div>'
        target_cell = _fmt_ms(target)
        if estimated and target_cell != MISSING:
            target_cell += ' <span class="tag est" title="estimated from host timing and the profile">est.</span>'
        latency_ratio = _number(variant.get("latency_ratio"))
        p50_title = f' title="{_fmt_ratio(latency_ratio)} of the reference latency"' if latency_ratio is not None else ""
        fallback_title = f' title="{_e(", ".join(str(n) for n in fallback))}"' if fallback else ""
        cells = [
            f"<td>{name_cell}</td>",
            f"<td>{_text(variant.get('precision'))}</td>",
            f'<td class="num" title="{_e(_fmt_int(variant.get("size_bytes")))} bytes">{_fmt_kb(variant.get("size_bytes"))}</td>',
            f'<td class="num">{_fmt_ratio(variant.get("size_ratio"))}</td>',
            f'<td class="num">{_fmt_metric(variant.get("accuracy"), row_metric)}</td>',
            f'<td class="num">{_fmt_delta(variant.get("accuracy_delta"), row_metric, unit=False)}</td>',
            f'<td class="num">{_fmt_fraction(variant.get("agreement"))}</td>',
            f'<td class="num">{_fmt_significant(variant.get("cosine"), 6)}</td>',
            f'<td class="num">{_fmt_general(variant.get("max_abs_error"))}</td>',
            f'<td class="num"{p50_title}>{_fmt_ms(latency.get("p50"))}</td>',
            f'<td class="num">{_fmt_ms(latency.get("p95"))}</td>',
            f'<td class="num" title="{_e(_source_text(variant))}">{target_cell}</td>',
            f'<td class="num"{fallback_title}>{len(fallback)}</td>',
            f'<td class="num">{_fmt_sparsity(variant.get("sparsity"))}</td>',
            f"<td>{_gate_status(variant)}</td>",
        ]
        row_class = ' class="selected"' if is_selected else ""
        parts.append(f'<tr{row_class} data-variant="{_e(name)}">{"".join(cells)}</tr>\n')
        notes = [n for n in _as_list(variant.get("notes")) if n not in (None, "")]
        if notes:
            note_items = "".join(f"<li>{_e(n)}</li>" for n in notes)
            parts.append(f'<tr class="variant-notes{" selected" if is_selected else ""}"><td colspan="{len(headers)}"><ul>{note_items}</ul></td></tr>\n')
    parts.append("</tbody>\n</table>\n</div>\n")
    parts.append(
        '<p class="muted small">Host latencies are measured on the build host; the target column is measured on '
        "the target or, marked <em>est.</em>, estimated for it. kB = 1000 bytes.</p>\n</section>\n"
    )
    return "".join(parts)


def _gate_status(variant: dict) -> str:
    passed = variant.get("passed")
    if passed is True:
        status = '<span class="badge small pass">PASS</span>'
    elif passed is False:
        status = '<span class="badge small fail">FAIL</span>'
    else:
        status = MISSING
    messages = []
    for failure in _as_list(variant.get("failed_gates")):
        failure = _as_dict(failure)
        message = failure.get("message")
        if not message:
            message = f"{failure.get('gate', 'gate')}: {failure.get('value')} (threshold {failure.get('threshold')})"
        messages.append(f"<li>{_e(message)}</li>")
    if messages:
        status += f'<ul class="failures">{"".join(messages)}</ul>'
    return status


def _quantization_section(variants: list[dict]) -> str:
    quantized = [v for v in variants if isinstance(v.get("quantization"), dict) and v.get("quantization")]
    if not variants:
        return ""
    parts = ['<section id="quantization">\n<h2>Quantization</h2>\n']
    if not quantized:
        parts.append('<p class="muted">No variant is quantized.</p>\n')
    for variant in quantized:
        quantization = variant["quantization"]
        parts.append(f'<div class="quant">\n<h3>{_text(variant.get("name"))}</h3>\n<dl class="kv">\n')
        for key, value in quantization.items():
            if key == "reason":
                continue
            parts.append(f"<div><dt>{_e(key.replace('_', ' '))}</dt><dd>{_fmt_value(value)}</dd></div>\n")
        parts.append("</dl>\n")
        if quantization.get("reason"):
            parts.append(f'<p class="reason">{_e(quantization["reason"])}</p>\n')
        fallback = _as_list(variant.get("fallback_nodes"))
        if fallback:
            nodes = ", ".join(f"<code>{_e(n)}</code>" for n in fallback)
            parts.append(f'<p class="small">Kept in float ({len(fallback)}): {nodes}</p>\n')
        parts.append("</div>\n")
    plain = [v.get("name") for v in variants if v not in quantized]
    if quantized and plain:
        parts.append(f'<p class="muted small">Not quantized: {", ".join(_text(n) for n in plain)}.</p>\n')
    parts.append("</section>\n")
    return "".join(parts)


def _sensitivity_section(report: dict, variants: list[dict]) -> str:
    sensitivity = _as_dict(report.get("sensitivity"))
    if not sensitivity:
        return ""
    fallback_by_variant = {v.get("name"): {str(n) for n in _as_list(v.get("fallback_nodes"))} for v in variants}
    parts = [
        '<section id="sensitivity">\n<h2>Per-node sensitivity</h2>\n',
        '<p class="muted small">How much quantizing each node alone hurts the metric; the most harmful '
        "nodes are the first kept in float.</p>\n",
    ]
    for variant_name, entries in sensitivity.items():
        nodes = [_as_dict(n) for n in _as_list(entries)]
        nodes.sort(key=lambda n: _number(n.get("score")) if _number(n.get("score")) is not None else -math.inf, reverse=True)
        top = nodes[:_SENSITIVITY_TOP_NODES]
        scores = [s for s in (_number(n.get("score")) for n in top) if s is not None]
        top_score = max((abs(s) for s in scores), default=0.0)
        kept = fallback_by_variant.get(variant_name, set())
        shown = f"top {len(top)} of {len(nodes)} nodes" if len(nodes) > len(top) else f"{len(nodes)} nodes"
        parts.append(f'<h3>{_e(variant_name)} <span class="muted small">({shown})</span></h3>\n')
        if not top:
            parts.append('<p class="muted">No nodes were scored.</p>\n')
            continue
        parts.append(
            '<div class="table-scroll">\n<table class="sensitivity">\n<thead>\n<tr><th>Node</th><th>Op</th>'
            '<th class="num">Score</th><th class="barcol"></th><th></th></tr>\n</thead>\n<tbody>\n'
        )
        for node in top:
            score = _number(node.get("score"))
            width = 0.0 if score is None or top_score == 0 else 100.0 * abs(score) / top_score
            tag = '<span class="tag">kept in float</span>' if str(node.get("node")) in kept else ""
            parts.append(
                f"<tr><td><code>{_text(node.get('node'))}</code></td><td>{_text(node.get('op_type'))}</td>"
                f'<td class="num">{_fmt_general(score)}</td>'
                f'<td class="barcol"><div class="bar" style="width:{width:.1f}%"></div></td><td>{tag}</td></tr>\n'
            )
        parts.append("</tbody>\n</table>\n</div>\n")
    parts.append("</section>\n")
    return "".join(parts)


def _gates_section(report: dict, variants: list[dict], metric: Any) -> str:
    gates = _as_dict(report.get("gates"))
    thresholds = {k: v for k, v in gates.items() if k != "passed"}
    failing: dict[str, list[str]] = {}
    for variant in variants:
        for failure in _as_list(variant.get("failed_gates")):
            gate = _as_dict(failure).get("gate")
            if gate is not None:
                failing.setdefault(str(gate), []).append(str(variant.get("name")))
    parts = ['<section id="gates">\n<h2>Gates</h2>\n']
    names = list(thresholds) + [g for g in failing if g not in thresholds]
    if not names:
        parts.append('<p class="muted">No gates were set.</p>\n</section>\n')
        return "".join(parts)
    parts.append(
        '<div class="table-scroll">\n<table class="gates">\n<thead>\n<tr><th>Gate</th><th>Meaning</th>'
        '<th class="num">Threshold</th><th>Variants failing it</th></tr>\n</thead>\n<tbody>\n'
    )
    for gate in names:
        who = failing.get(gate, [])
        who_cell = ", ".join(_e(n) for n in who) if who else '<span class="muted">none</span>'
        parts.append(
            f"<tr><td><code>{_e(gate)}</code></td><td>{_e(_GATE_LABELS.get(gate, ''))}</td>"
            f'<td class="num">{_fmt_threshold(gate, thresholds.get(gate), metric)}</td><td>{who_cell}</td></tr>\n'
        )
    parts.append("</tbody>\n</table>\n</div>\n</section>\n")
    return "".join(parts)


def _host_section(report: dict) -> str:
    host = _as_dict(report.get("host"))
    if not host:
        return ""
    is_target = host.get("is_target")
    if is_target is True:
        target_text = '<span class="badge small pass">yes</span> latencies are measured on the target'
    elif is_target is False:
        target_text = '<span class="badge small neutral">no</span> host latencies are indicative; target latency is estimated or measured on a device'
    else:
        target_text = MISSING
    features = [f for f in _as_list(host.get("cpu_features")) if f not in (None, "")]
    feature_html = " ".join(f'<span class="chip">{_e(f)}</span>' for f in features) if features else MISSING
    rows = [
        ("Machine", _text(host.get("machine"))),
        ("CPU", _text(host.get("cpu"))),
        ("CPU features", feature_html),
        ("Host is the target", target_text),
        ("Why", _text(host.get("reason"))),
    ]
    known = {"machine", "cpu", "cpu_features", "is_target", "reason"}
    rows += [(_e(k.replace("_", " ")), _fmt_value(v)) for k, v in host.items() if k not in known]
    return _kv_section("host", "Build host", rows)


def _lineage_section(report: dict) -> str:
    lineage = _as_dict(report.get("lineage"))
    parts = ['<section id="lineage">\n<h2>Lineage</h2>\n']
    hashes = [(k, v) for k, v in lineage.items() if k != "tools"]
    if hashes:
        parts.append('<table class="kvtable">\n<tbody>\n')
        parts.extend(
            f"<tr><th>{_e(k.replace('_sha256', '').replace('_', ' '))}</th><td>{_code(v) if isinstance(v, str) else _fmt_value(v)}</td></tr>\n"
            for k, v in hashes
        )
        parts.append("</tbody>\n</table>\n")
    else:
        parts.append('<p class="muted">No lineage recorded.</p>\n')
    tools = _as_dict(lineage.get("tools"))
    parts.append("<h3>Tool versions</h3>\n")
    if tools:
        parts.append('<table class="kvtable">\n<tbody>\n')
        parts.extend(f"<tr><th>{_e(k)}</th><td><code>{_text(v)}</code></td></tr>\n" for k, v in sorted(tools.items()))
        parts.append("</tbody>\n</table>\n")
    else:
        parts.append(f'<p class="muted">{MISSING}</p>\n')
    parts.append("</section>\n")
    return "".join(parts)


def _passes_section(report: dict) -> str:
    passes = [_as_dict(p) for p in _as_list(report.get("passes"))]
    parts = ['<section id="passes">\n<h2>Passes</h2>\n']
    if not passes:
        parts.append('<p class="muted">No pass timings recorded.</p>\n</section>\n')
        return "".join(parts)
    total = sum(s for s in (_number(p.get("seconds")) for p in passes) if s is not None and s > 0)
    parts.append(
        '<div class="table-scroll">\n<table class="passes">\n<thead>\n<tr><th>Pass</th><th class="num">Seconds</th>'
        '<th class="barcol">Share</th><th></th></tr>\n</thead>\n<tbody>\n'
    )
    for entry in passes:
        seconds = _number(entry.get("seconds"))
        width = 100.0 * seconds / total if seconds is not None and seconds > 0 and total > 0 else 0.0
        cached = '<span class="tag" title="reused from the build cache">cached</span>' if entry.get("cached") is True else ""
        parts.append(
            f"<tr><td>{_text(entry.get('name'))}</td><td class=\"num\">{_fmt_fixed(seconds, 2)}</td>"
            f'<td class="barcol"><div class="bar" style="width:{width:.1f}%"></div></td><td>{cached}</td></tr>\n'
        )
    parts.append(f'</tbody>\n<tfoot>\n<tr><th>Total</th><td class="num">{_fmt_fixed(total, 2)}</td><td></td><td></td></tr>\n</tfoot>\n')
    parts.append("</table>\n</div>\n</section>\n")
    return "".join(parts)


def _footer(report: dict) -> str:
    created_by = report.get("created_by") or "edgepack"
    schema = report.get("schema_version")
    schema_text = f" · report schema {_e(schema)}" if schema is not None else ""
    return f'<footer class="muted small">Generated by {_e(created_by)}{schema_text}. This page is self-contained: no scripts, fonts or network.</footer>\n'


def _kv_section(section_id: str, title: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>\n" for k, v in rows)
    return f'<section id="{section_id}">\n<h2>{_e(title)}</h2>\n<table class="kvtable">\n<tbody>\n{body}</tbody>\n</table>\n</section>\n'


# ---------------------------------------------------------------------------------------------------
# Chart: accuracy vs. latency vs. size


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


@dataclasses.dataclass(frozen=True)
class _Point:
    name: str
    x: float
    y: float
    size: float | None
    passed: Any
    selected: bool
    title: str


def _chart_section(variants: list[dict], selected: Any, metric: Any) -> str:
    parts = [
        '<section id="chart">\n<h2>Accuracy vs. latency vs. size</h2>\n',
    ]
    if not variants:
        parts.append('<p class="muted">No variants to plot.</p>\n</section>\n')
        return "".join(parts)

    x_of, x_label = _pick_x(variants)
    y_of, y_label, y_percent = _pick_y(variants, metric)
    points: list[_Point] = []
    not_plotted: list[str] = []
    for variant in variants:
        name = str(variant.get("name") if variant.get("name") is not None else MISSING)
        x, y = x_of(variant), y_of(variant)
        if x is None or y is None:
            missing = " and ".join(w for w, v in (("latency", x), (y_label, y)) if v is None)
            not_plotted.append(f"{_e(name)} (no {_e(missing)})")
            continue
        size = _number(variant.get("size_bytes"))
        title = f"{name}: {y_label} {_plain_metric(y, y_percent)}, {x_label} {_fmt_ms(x)} ms, size {_fmt_bytes(size)}"
        points.append(_Point(name, x, y, size if size is not None and size > 0 else None, variant.get("passed"),
                             selected is not None and variant.get("name") == selected, title))
    if not points:
        parts.append(f'<p class="muted">Nothing to plot: no variant has both a latency and a {_e(y_label)}.</p>\n')
    else:
        parts.append(_chart_svg(points, x_label, y_label, y_percent))
    if not_plotted:
        parts.append(f'<p class="muted small">Not plotted: {", ".join(not_plotted)}.</p>\n')
    parts.append("</section>\n")
    return "".join(parts)


def _pick_x(variants: list[dict]) -> tuple[Callable[[dict], float | None], str]:
    def target(v: dict) -> float | None:
        value, _ = _target_latency(v)
        return value if value is not None and value >= 0 else None

    def host_p50(v: dict) -> float | None:
        value = _number(_latency(v).get("p50"))
        return value if value is not None and value >= 0 else None

    if any(target(v) is not None for v in variants):
        estimated = any(_target_latency(v)[1] for v in variants)
        return target, "estimated target latency" if estimated else "target latency"
    return host_p50, "host p50 latency"


def _pick_y(variants: list[dict], metric: Any) -> tuple[Callable[[dict], float | None], str, bool]:
    if any(_number(v.get("accuracy")) is not None for v in variants):
        label = f"accuracy ({metric})" if metric else "accuracy"
        return (lambda v: _number(v.get("accuracy"))), label, _is_fraction_metric(metric)
    return (lambda v: _number(v.get("agreement"))), "agreement with reference", True


def _chart_svg(points: list[_Point], x_label: str, y_label: str, y_percent: bool) -> str:
    width, height = 860, 440
    left, right, top, bottom = 78, width - 190, 34, height - 64
    r_max, r_min, r_unknown = 26.0, 4.0, 6.0

    xs = [p.x for p in points]
    ys = [p.y for p in points]
    inset = r_max + 2  # keeps a bubble on a clamped domain edge (0 ms, 100 %) inside the plot
    x_axis = _make_axis(xs, left + inset, right - inset, allow_log=min(xs) > 0, ceiling_one=False)
    y_axis = _make_axis(ys, bottom - inset, top + inset, allow_log=False, ceiling_one=y_percent)
    max_size = max((p.size for p in points if p.size is not None), default=None)

    def radius(p: _Point) -> float:
        if p.size is None or max_size is None:
            return r_unknown
        return max(r_min, r_max * math.sqrt(p.size / max_size))  # area, not radius, grows with size

    out = [
        f'<figure class="chart-figure">\n<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-labelledby="chart-title chart-desc" font-family="system-ui, sans-serif" font-size="12">\n',
        f'<title id="chart-title">{_e(y_label)} vs. {_e(x_label)}; bubble area is model size</title>\n',
        f'<desc id="chart-desc">{len(points)} variant(s). x: {_e(x_label)} in ms{", log scale" if x_axis.log else ""}. '
        f"y: {_e(y_label)}. Bubble area proportional to size on disk.</desc>\n",
        f'<rect class="plot-bg" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fafbfc" stroke="#d0d7de"/>\n',
        '<g class="grid">\n',
    ]
    for tick in x_axis.ticks:
        px = x_axis(tick)
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#e6e9ee"/>\n')
    for tick in y_axis.ticks:
        py = y_axis(tick)
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e6e9ee"/>\n')
    out.append('</g>\n<g class="axis">\n')
    for tick in x_axis.ticks:
        px = x_axis(tick)
        out.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 5}" stroke="#57606a"/>\n')
        out.append(f'<text x="{px:.1f}" y="{bottom + 19}" text-anchor="middle" fill="#57606a">{_e(_tick_label(tick, x_axis, False))}</text>\n')
    for tick in y_axis.ticks:
        py = y_axis(tick)
        out.append(f'<line x1="{left - 5}" y1="{py:.1f}" x2="{left}" y2="{py:.1f}" stroke="#57606a"/>\n')
        out.append(f'<text x="{left - 8}" y="{py + 4:.1f}" text-anchor="end" fill="#57606a">{_e(_tick_label(tick, y_axis, y_percent))}</text>\n')
    x_title = f"{x_label} (ms{', log scale' if x_axis.log else ''})"
    out.append(f'<text class="axis-title" x="{(left + right) / 2:.1f}" y="{height - 18}" text-anchor="middle" fill="#1f2430" font-weight="600">{_e(x_title)}</text>\n')
    out.append(
        f'<text class="axis-title" x="18" y="{(top + bottom) / 2:.1f}" text-anchor="middle" fill="#1f2430" font-weight="600" '
        f'transform="rotate(-90 18 {(top + bottom) / 2:.1f})">{_e(y_label)}</text>\n'
    )
    out.append("</g>\n")

    placed = [(p, x_axis(p.x), y_axis(p.y), radius(p)) for p in points]
    # Big bubbles first so small ones stay visible and clickable-looking on top; the selected one last.
    placed.sort(key=lambda item: (item[0].selected, -item[3]))
    out.append('<g class="points">\n')
    for p, cx, cy, r in placed:
        fill, stroke = ("#2f9e44", "#2b8a3e") if p.passed is True else (("#e03131", "#c92a2a") if p.passed is False else ("#868e96", "#495057"))
        status = "pass" if p.passed is True else ("fail" if p.passed is False else "unknown")
        classes = f"point {status}" + (" selected" if p.selected else "") + (" nosize" if p.size is None else "")
        extra = ' stroke-width="3.5"' if p.selected else ' stroke-width="1.5"'
        if p.selected:
            stroke = "#3b5bdb"
        dash = ' stroke-dasharray="3 2"' if p.size is None else ""
        out.append(
            f'<circle class="{classes}" data-variant="{_e(p.name)}" cx="{cx:.2f}" cy="{cy:.2f}" r="{r:.2f}" '
            f'fill="{fill}" fill-opacity="0.45" stroke="{stroke}"{extra}{dash}><title>{_e(p.title)}</title></circle>\n'
        )
    out.append("</g>\n<g class=\"labels\">\n")
    out.extend(_point_labels(placed, (left, top, right, bottom)))
    out.append("</g>\n")
    out.append(_legend(right + 22, top, max_size, r_max))
    out.append("</svg>\n")
    caption = "Bubble area is proportional to size on disk; green passed every gate, red failed one; the blue ring marks the selected variant."
    if x_axis.log:
        caption += " Latency is on a log scale because it spans more than 10×."
    out.append(f"<figcaption class=\"muted small\">{_e(caption)}</figcaption>\n</figure>\n")
    return "".join(out)


def _point_labels(placed: list[tuple[_Point, float, float, float]], bounds: tuple[float, float, float, float]) -> list[str]:
    """One label per point, at the first side (right, left, above, below) that overlaps nothing."""
    left, top, right, bottom = bounds
    char_w, text_h = 7.0, 14.0
    taken: list[tuple[float, float, float, float]] = [(cx - r, cy - r, cx + r, cy + r) for _, cx, cy, r in placed]
    labels = []
    for index, (p, cx, cy, r) in enumerate(placed):
        text = ("★ " if p.selected else "") + p.name
        w = char_w * len(text)
        candidates = [
            (cx + r + 5, cy + 4, "start", (cx + r + 5, cy - text_h / 2, cx + r + 5 + w, cy + text_h / 2)),
            (cx - r - 5, cy + 4, "end", (cx - r - 5 - w, cy - text_h / 2, cx - r - 5, cy + text_h / 2)),
            (cx, cy - r - 6, "middle", (cx - w / 2, cy - r - 6 - text_h, cx + w / 2, cy - r - 6)),
            (cx, cy + r + 15, "middle", (cx - w / 2, cy + r + 2, cx + w / 2, cy + r + 2 + text_h)),
        ]
        others = taken[:index] + taken[index + 1:]

        def fits(box: tuple[float, float, float, float]) -> bool:
            inside = box[0] >= left + 2 and box[2] <= right + 10 and box[1] >= top - 30 and box[3] <= bottom - 2
            return inside and not any(_overlaps(box, other) for other in others)

        x, y, anchor, box = next((c for c in candidates if fits(c[3])), candidates[0] if cx < (left + right) / 2 else candidates[1])
        taken.append(box)
        weight = ' font-weight="700"' if p.selected else ""
        cls = "label selected" if p.selected else "label"
        labels.append(f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="#1f2430"{weight}>{_e(text)}</text>\n')
    return labels


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _legend(x: float, y: float, max_size: float | None, r_max: float) -> str:
    out = [f'<g class="legend" transform="translate({x:.0f} {y:.0f})">\n', '<text x="0" y="10" font-weight="600" fill="#1f2430">Bubble area = size</text>\n']
    if max_size is not None:
        cy = 20 + r_max
        for fraction, cx in ((1.0, r_max + 2), (0.25, 2 * r_max + 44)):
            r = r_max * math.sqrt(fraction)
            out.append(f'<circle class="legend-bubble" cx="{cx:.1f}" cy="{cy + r_max - r:.1f}" r="{r:.1f}" fill="none" stroke="#868e96"/>\n')
            out.append(f'<text x="{cx:.1f}" y="{cy + r_max + 16:.1f}" text-anchor="middle" fill="#57606a">{_e(_fmt_bytes(max_size * fraction))}</text>\n')
        y_next = 20 + 2 * r_max + 40
    else:
        out.append('<text x="0" y="30" fill="#57606a">(sizes unknown)</text>\n')
        y_next = 50
    for label, fill, stroke, width in (
        ("passed gates", "#2f9e44", "#2b8a3e", 1.5),
        ("failed a gate", "#e03131", "#c92a2a", 1.5),
        ("selected", "none", "#3b5bdb", 3.5),
    ):
        opacity = ' fill-opacity="0.45"' if fill != "none" else ""
        out.append(f'<circle class="legend-key" cx="8" cy="{y_next:.0f}" r="6" fill="{fill}"{opacity} stroke="{stroke}" stroke-width="{width}"/>\n')
        out.append(f'<text x="22" y="{y_next + 4:.0f}" fill="#1f2430">{label}</text>\n')
        y_next += 22
    out.append("</g>\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# Values and formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _plain(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def _text(value: Any) -> str:
    return MISSING if value is None or value == "" else _e(value)


def _code(value: Any) -> str:
    return MISSING if value is None or value == "" else f"<code>{_e(value)}</code>"


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _latency(variant: dict) -> dict:
    return _as_dict(variant.get("latency_ms"))


def _target_latency(variant: dict) -> tuple[float | None, bool]:
    """The target latency and whether it is an estimate."""
    measured = _number(variant.get("target_latency_ms"))
    if measured is not None:
        return measured, variant.get("target_latency_source") == "estimate"
    estimate = _number(variant.get("estimated_target_latency_ms"))
    return estimate, estimate is not None


def _source_text(variant: dict) -> str:
    source = variant.get("target_latency_source")
    if source:
        return f"source: {source}"
    value, estimated = _target_latency(variant)
    return "source: estimate" if estimated else ("" if value is None else "source: measured")


def _is_fraction_metric(metric: Any) -> bool:
    return metric in _FRACTION_METRICS


def _headline_metric(variant: dict, metric: Any) -> tuple[str, str]:
    accuracy = _number(variant.get("accuracy"))
    if accuracy is not None:
        return _fmt_metric(accuracy, variant.get("metric") or metric), f"Accuracy ({_e(metric)})" if metric else "Accuracy"
    return _fmt_fraction(variant.get("agreement")), "Agreement"


def _with_unit(text: str, unit: str) -> str:
    return text if text == MISSING else f"{text} {unit}"


def _signed(value: float, text: str) -> str:
    if value == 0:
        return text
    return ("−" if value < 0 else "+") + text


def _fmt_fixed(value: Any, decimals: int) -> str:
    n = _number(value)
    return MISSING if n is None else f"{n:,.{decimals}f}"


def _fmt_general(value: Any) -> str:
    return _fmt_significant(value, 4)


def _fmt_significant(value: Any, digits: int) -> str:
    n = _number(value)
    return MISSING if n is None else f"{n:.{digits}g}"


def _fmt_int(value: Any) -> str:
    n = _number(value)
    return MISSING if n is None else f"{n:,.0f}"


def _fmt_fraction(value: Any) -> str:
    n = _number(value)
    return MISSING if n is None else f"{n * 100:.2f}%"


def _fmt_metric(value: Any, metric: Any) -> str:
    return _fmt_fraction(value) if _is_fraction_metric(metric) else _fmt_general(value)


def _plain_metric(value: float, percent: bool) -> str:
    return f"{value * 100:.2f}%" if percent else f"{value:.4g}"


def _fmt_delta(value: Any, metric: Any, *, unit: bool = True) -> str:
    n = _number(value)
    if n is None:
        return MISSING
    if _is_fraction_metric(metric):  # one point = 0.01 of a fraction metric
        return _signed(n, f"{abs(n) * 100:.2f}") + (" pt" if unit else "")
    return _signed(n, f"{abs(n):.4g}")


def _fmt_ratio(value: Any) -> str:
    n = _number(value)
    return MISSING if n is None else f"{n:.2f}×"


def _fmt_kb(size: Any) -> str:
    n = _number(size)
    return MISSING if n is None else f"{n / 1000:,.1f}"


def _fmt_bytes(size: Any) -> str:
    n = _number(size)
    if n is None:
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _fmt_ms(value: Any) -> str:
    n = _number(value)
    if n is None:
        return MISSING
    magnitude = abs(n)
    if magnitude == 0:
        return "0"
    if magnitude >= 100:
        return f"{n:,.0f}"
    if magnitude >= 10:
        return f"{n:.1f}"
    if magnitude >= 1:
        return f"{n:.2f}"
    return f"{n:.{1 - math.floor(math.log10(magnitude))}f}"  # two significant digits below 1 ms


def _fmt_duration(value: Any) -> str:
    n = _number(value)
    if n is None:
        return MISSING
    if n < 60:
        return f"{n:.1f} s"
    minutes, seconds = divmod(round(n), 60)
    return f"{minutes} min {seconds:02d} s"


def _fmt_sparsity(value: Any) -> str:
    n = _number(value)
    if n is not None:
        return f"{n * 100:.0f}%"
    if isinstance(value, dict):
        sparsity = _number(value.get("sparsity"))
        pattern = value.get("pattern")
        text = f"{sparsity * 100:.0f}%" if sparsity is not None else MISSING
        return text + (f" ({_e(pattern)})" if pattern else "")
    return _text(value)


def _fmt_threshold(gate: str, value: Any, metric: Any) -> str:
    if value is None:
        return '<span class="muted">not set</span>'
    n = _number(value)
    if n is None:
        return _e(value)
    if gate == "max_accuracy_drop" and _is_fraction_metric(metric):
        return f"{n:g} ({n * 100:.2f} pt)"
    if gate.endswith("_ms"):
        return f"{n:g} ms"
    if gate.endswith("_mb"):
        return f"{n:g} MB"
    if gate == "min_agreement":
        return f"{n * 100:.2f}%"
    return f"{n:g}"


def _fmt_value(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return _fmt_general(value)
    if isinstance(value, dict):
        return ", ".join(f"{_e(k)}: {_fmt_value(v)}" for k, v in value.items()) or MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) or MISSING
    return _e(value)


_CSS = """
:root{--bg:#f5f6f8;--card:#fff;--ink:#1f2430;--muted:#5f6b7a;--line:#e3e7ee;--accent:#3b5bdb;--accent-soft:#edf2ff;
--pass:#2b8a3e;--pass-soft:#ebfbee;--fail:#c92a2a;--fail-soft:#fff5f5;--note:#e8a400;--note-soft:#fff9db;
--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
@media (prefers-color-scheme:dark){:root{--bg:#121418;--card:#1b1f26;--ink:#e6e9ef;--muted:#9aa4b2;--line:#2c323c;
--accent:#748ffc;--accent-soft:#1f2742;--pass:#69db7c;--pass-soft:#15291b;--fail:#ff8787;--fail-soft:#301b1b;
--note:#fcc419;--note-soft:#2a2615}
.chart .plot-bg{fill:#161a20;stroke:var(--line)}.chart .grid line{stroke:#262c35}
.chart text{fill:var(--muted)}.chart .axis-title,.chart .label,.chart .legend text{fill:var(--ink)}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.wrap{max-width:1200px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:1.7rem;margin:0;line-height:1.2}
h2{font-size:1.15rem;margin:0 0 12px}
h3{font-size:1rem;margin:18px 0 8px}
.version{font-weight:500;color:var(--muted);font-size:1.1rem}
.page-head{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 24px}
.title-row{display:flex;align-items:center;gap:14px;flex-wrap:wrap}
.profile-desc{margin:6px 0 0}
.facts{display:flex;flex-wrap:wrap;gap:6px 28px;margin:14px 0 0}
.facts div{min-width:0}
.facts dt{font-size:.72rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.facts dd{margin:0;font-weight:500;overflow-wrap:anywhere}
.facts.bundle{border-top:1px solid var(--line);padding-top:12px}
.toc{margin-top:14px;font-size:.85rem}
.toc a{color:var(--accent);text-decoration:none;margin-right:12px}
.toc a:hover{text-decoration:underline}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 24px;margin:18px 0}
.muted{color:var(--muted)}
.small{font-size:.82rem}
.badge{display:inline-block;padding:3px 12px;border-radius:999px;font-weight:700;font-size:.8rem;letter-spacing:.06em;border:1px solid}
.badge.small{padding:0 8px;font-size:.7rem}
.badge.pass{background:var(--pass-soft);color:var(--pass);border-color:var(--pass)}
.badge.fail{background:var(--fail-soft);color:var(--fail);border-color:var(--fail)}
.badge.neutral{color:var(--muted);border-color:var(--line)}
.tag{display:inline-block;padding:0 7px;border-radius:6px;font-size:.72rem;background:var(--line);color:var(--muted);white-space:nowrap;vertical-align:1px}
.tag.selected-marker{background:var(--accent);color:#fff;font-weight:600}
.tag.est{background:transparent;border:1px dashed var(--muted);padding:0 4px}
.chip{display:inline-block;padding:0 7px;margin:1px 2px;border-radius:999px;background:var(--bg);border:1px solid var(--line);font-family:var(--mono);font-size:.78rem}
code{font-family:var(--mono);font-size:.84em;overflow-wrap:anywhere}
.reason{font-size:1.02rem;margin:0 0 8px}
.callout{border-left:4px solid var(--note);background:var(--note-soft);padding:8px 14px;border-radius:0 8px 8px 0;margin:8px 0}
.callout.fail{border-left-color:var(--fail);background:var(--fail-soft)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:10px;padding:10px 14px}
.card .k{font-size:.75rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.card .v{font-size:1.4rem;font-weight:650;font-variant-numeric:tabular-nums}
.card .s{font-size:.8rem;color:var(--muted);min-height:1.2em}
.table-scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{padding:7px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{font-size:.72rem;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600;white-space:nowrap;border-bottom:2px solid var(--line)}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover td{background:rgba(127,127,127,.06)}
tr.selected td{background:var(--accent-soft)}
tr.selected td:first-child{box-shadow:inset 4px 0 0 var(--accent)}
tr.selected:hover td{background:var(--accent-soft)}
tr.variant-notes td{padding-top:0;color:var(--muted);font-size:.82rem}
tr.variant-notes ul{margin:0;padding-left:18px}
.vname{font-weight:600}
ul.failures{margin:4px 0 0;padding-left:16px;color:var(--fail);font-size:.8rem;min-width:220px}
.kvtable th{width:220px;color:var(--muted);font-weight:500;text-transform:none;font-size:.88rem;white-space:nowrap}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:6px 18px;margin:0 0 8px}
.kv dt{font-size:.72rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.kv dd{margin:0;font-family:var(--mono);font-size:.88rem}
.quant{border-top:1px solid var(--line);padding-top:4px}
.quant:first-of-type{border-top:0}
.barcol{width:32%}
.bar{height:8px;background:var(--accent);border-radius:4px;min-width:1px;opacity:.8;margin-top:6px}
tfoot th,tfoot td{border-bottom:0;font-weight:600}
figure{margin:0}
.chart{display:block;max-width:100%;height:auto}
footer{text-align:center;margin-top:24px}
@media print{body{background:#fff}.wrap{max-width:none;padding:0}section,.page-head{break-inside:avoid;border-color:#ccc}
.toc{display:none}.table-scroll{overflow:visible}}
"""
