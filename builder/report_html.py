"""Render a build report as one self-contained HTML page (`report_templates/report.html`).

Takes the typed report or the dict the builder writes to `.report.json`. Reports come from failed and
partial builds too, so any field may be missing, null or of an unexpected type: such values render as an
em dash instead of breaking the page. The templates autoescape every value, since names, notes and paths
come from user config and model files.

This module derives what the page shows beyond the report's own fields (the selected variant, the gate
table, the sensitivity ranking, the pass shares, the chart's geometry); the templates lay it out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from builder.pages import as_data, as_list, as_mapping, number, records, render_page
from builder.report_chart import chart_section, target_latency

__all__ = ["render_report_html", "write_report_html"]

_SENSITIVITY_TOP_NODES = 10
GATE_LABELS = {
    "max_accuracy_drop": "Largest accuracy drop vs. reference",
    "max_p95_latency_ms": "Slowest p95 latency on target",
    "max_size_mb": "Largest model size",
    "min_agreement": "Smallest top-1 agreement with reference",
}
_HOST_FIELDS = ("machine", "cpu", "cpu_features", "is_target", "reason")

Report = BaseModel | Mapping[str, Any]


def write_report_html(report: Report, path: Path) -> None:
    """Write the rendered page to `path` (UTF-8), creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report_html(report), encoding="utf-8")


def render_report_html(report: Report) -> str:
    """The whole report as one HTML document (a string)."""
    data = as_data(report)
    variants = records(data.get("variants"))
    selected = data.get("selected")
    metric = data.get("metric") or next((v.get("metric") for v in variants if v.get("metric")), None)
    host = as_mapping(data.get("host"))
    lineage = as_mapping(data.get("lineage"))
    return render_page(
        "report.html",
        report=data,
        variants=variants,
        selected=selected,
        selected_variant=next((v for v in variants if selected is not None and v.get("name") == selected), None),
        metric=metric,
        reference_name=as_mapping(data.get("reference")).get("name") or "reference",
        quantized=[v for v in variants if isinstance(v.get("quantization"), Mapping) and v.get("quantization")],
        chart=chart_section(variants, selected, metric),
        sensitivity=_sensitivity(data, variants),
        gates=_gate_rows(data, variants),
        host=host,
        host_extra=[(k, v) for k, v in host.items() if k not in _HOST_FIELDS],
        lineage_hashes=[(k, v) for k, v in lineage.items() if k != "tools"],
        tools=sorted(as_mapping(lineage.get("tools")).items()),
        passes=_passes(data),
        target_latency=target_latency,
    )


@dataclasses.dataclass(frozen=True)
class SensitivityRow:
    node: Any
    op_type: Any
    score: float | None
    bar_percent: float
    kept_in_float: bool


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    variant: Any
    shown: str
    rows: tuple[SensitivityRow, ...]


def _sensitivity(report: Mapping[str, Any], variants: list[Mapping[str, Any]]) -> tuple[SensitivityTable, ...]:
    """Per variant, the nodes whose quantization alone hurts the metric most, most harmful first."""
    kept_by_variant = {v.get("name"): {str(n) for n in as_list(v.get("fallback_nodes"))} for v in variants}
    tables = []
    for variant_name, entries in as_mapping(report.get("sensitivity")).items():
        nodes = records(entries)
        nodes.sort(key=lambda n: number(n.get("score")) if number(n.get("score")) is not None else -math.inf, reverse=True)
        top = nodes[:_SENSITIVITY_TOP_NODES]
        top_score = max((abs(s) for s in (number(n.get("score")) for n in top) if s is not None), default=0.0)
        kept = kept_by_variant.get(variant_name, set())
        rows = []
        for node in top:
            score = number(node.get("score"))
            width = 0.0 if score is None or top_score == 0 else 100.0 * abs(score) / top_score
            rows.append(SensitivityRow(node.get("node"), node.get("op_type"), score, width, str(node.get("node")) in kept))
        shown = f"top {len(top)} of {len(nodes)} nodes" if len(nodes) > len(top) else f"{len(nodes)} nodes"
        tables.append(SensitivityTable(variant_name, shown, tuple(rows)))
    return tuple(tables)


@dataclasses.dataclass(frozen=True)
class GateRow:
    gate: str
    meaning: str
    threshold: Any
    failing: tuple[str, ...]


def _gate_rows(report: Mapping[str, Any], variants: list[Mapping[str, Any]]) -> tuple[GateRow, ...]:
    """Every gate set, plus any gate a variant failed that the report does not list, with who failed it."""
    thresholds = {str(k): v for k, v in as_mapping(report.get("gates")).items() if k != "passed"}
    failing: dict[str, list[str]] = {}
    for variant in variants:
        for failure in records(variant.get("failed_gates")):
            if failure.get("gate") is not None:
                failing.setdefault(str(failure.get("gate")), []).append(str(variant.get("name")))
    names = list(thresholds) + [g for g in failing if g not in thresholds]
    return tuple(GateRow(g, GATE_LABELS.get(g, ""), thresholds.get(g), tuple(failing.get(g, []))) for g in names)


@dataclasses.dataclass(frozen=True)
class PassRow:
    name: Any
    seconds: float | None
    share_percent: float
    cached: bool


@dataclasses.dataclass(frozen=True)
class Passes:
    rows: tuple[PassRow, ...]
    total_seconds: float


def _passes(report: Mapping[str, Any]) -> Passes:
    entries = records(report.get("passes"))
    seconds = [number(p.get("seconds")) for p in entries]
    total = sum(s for s in seconds if s is not None and s > 0)
    rows = tuple(
        PassRow(p.get("name"), s, 100.0 * s / total if s is not None and s > 0 and total > 0 else 0.0, p.get("cached") is True)
        for p, s in zip(entries, seconds)
    )
    return Passes(rows, total)
