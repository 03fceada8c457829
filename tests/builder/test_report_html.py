"""The HTML build report: well-formed, self-contained, escaped, and robust to partial reports."""

from __future__ import annotations

import copy
import math
import re
from html.parser import HTMLParser

import pytest

from builder.report_html import render_report_html, write_report_html

VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageChecker(HTMLParser):
    """Checks that every element is closed in order, and collects the chart's points and the table rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.points: list[dict[str, str]] = []
        self.rows: list[dict[str, str]] = []
        self.svg_count = 0
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record(tag, attrs)
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record(tag, attrs)  # `<circle .../>`: opens and closes itself

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_ELEMENTS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'} at {self.getpos()}")
            return
        self.stack.pop()

    def _record(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self.svg_count += 1
        if tag == "circle" and "data-variant" in attributes:
            self.points.append(attributes)
        if tag == "tr" and "data-variant" in attributes:
            self.rows.append(attributes)


def check_page(page: str) -> PageChecker:
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == [], f"unclosed: {checker.stack}"
    assert page.startswith("<!DOCTYPE html>")
    assert {"html", "head", "body", "main", "style", "title"} <= checker.tags
    return checker


def assert_finite_points(checker: PageChecker) -> None:
    for point in checker.points:
        for attribute in ("cx", "cy", "r"):
            assert math.isfinite(float(point[attribute])), point
        assert float(point["r"]) > 0


def variant(name: str, **overrides: object) -> dict:
    base = {
        "name": name, "precision": name, "format": "onnx", "runtime": "onnxruntime", "size_bytes": 180_000,
        "size_ratio": 1.0, "metric": "top1", "accuracy": 0.983, "accuracy_delta": 0.0, "agreement": 1.0,
        "cosine": 1.0, "max_abs_error": 0.0, "latency_ms": {"p50": 0.21, "p95": 0.26, "mean": 0.22},
        "latency_ratio": 1.0, "estimated_target_latency_ms": 0.09, "target_latency_ms": 0.09,
        "target_latency_source": "estimate", "fallback_nodes": [], "sparsity": None, "quantization": None,
        "passed": True, "failed_gates": [], "notes": [], "cached": False,
    }
    base.update(overrides)
    return base


def sample_report() -> dict:
    """A realistic report: three variants, int8 selected, one variant failing a gate."""
    return {
        "schema_version": 1, "name": "digits-cnn", "version": "1.0.0", "profile": "jetson-orin-nano",
        "profile_description": "NVIDIA Jetson Orin Nano 8 GB, Ampere GPU with 32 tensor cores, 6-core Cortex-A78AE",
        "runtime": "onnxruntime", "created_by": "edgepack 0.1.0", "duration_s": 12.3,
        "host": {"machine": "x86_64", "cpu": "AMD EPYC 7763 64-Core Processor", "cpu_features": ["avx2", "fma", "avx512f", "avx512_vnni"],
                 "is_target": False, "reason": "profile targets aarch64; host is x86_64"},
        "metric": "top1", "selected": "int8",
        "selection_reason": "int8: smallest and fastest on target among 2 passing variants (0.28× the size of fp32, "
                            "accuracy −0.30 pt within the 0.50 pt budget).",
        "gates": {"max_accuracy_drop": 0.005, "max_p95_latency_ms": None, "max_size_mb": 0.15, "min_agreement": None, "passed": True},
        "reference": {"name": "fp32", "accuracy": 0.983, "size_bytes": 180_400},
        "variants": [
            variant("fp32", size_bytes=180_400, failed_gates=[{"gate": "max_size_mb", "value": 0.1804, "threshold": 0.15,
                                                                "message": "size 0.18 MB > 0.15 MB"}], passed=False, cached=True),
            variant("fp16", size_bytes=92_300, size_ratio=0.51, accuracy=0.983, accuracy_delta=0.0, agreement=1.0, cosine=0.99999,
                    max_abs_error=0.0021, latency_ms={"p50": 0.34, "p95": 0.41, "mean": 0.35}, latency_ratio=1.62,
                    estimated_target_latency_ms=0.05, target_latency_ms=0.05,
                    notes=["fp16 runs through casts on this host CPU; the target has native fp16"]),
            variant("int8", size_bytes=50_100, size_ratio=0.28, accuracy=0.98, accuracy_delta=-0.003, agreement=0.995,
                    cosine=0.9991, max_abs_error=0.2, latency_ms={"p50": 0.5, "p95": 0.62, "mean": 0.52}, latency_ratio=2.4,
                    estimated_target_latency_ms=0.012, target_latency_ms=0.012, fallback_nodes=["conv1"],
                    quantization={"activation_type": "int8", "weight_type": "int8", "per_channel": True, "reduce_range": False,
                                  "calibration": "minmax", "symmetric_activations": True,
                                  "reason": "the target's tensor cores run symmetric int8 activations"},
                    notes=["INT8 is 2.4x slower and 1.24x larger than fp32 on this host"]),
        ],
        "notes": ["Latency on the target is estimated: the build host is not the target.",
                  "fp32 kept as the reference; it fails max_size_mb."],
        "passes": [{"name": "check", "seconds": 0.1, "cached": False}, {"name": "fp16", "seconds": 0.8, "cached": True},
                   {"name": "quantize_int8", "seconds": 3.9, "cached": False}, {"name": "verify", "seconds": 5.2, "cached": False},
                   {"name": "benchmark", "seconds": 2.1, "cached": False}],
        "sensitivity": {"int8": [{"node": "fc2", "op_type": "Gemm", "score": 0.0008}, {"node": "conv1", "op_type": "Conv", "score": 0.012},
                                 {"node": "conv2", "op_type": "Conv", "score": 0.004}]},
        "lineage": {"source_model_sha256": "a" * 64, "calibration_sha256": "b" * 64, "validation_sha256": "c" * 64,
                    "config_sha256": "d" * 64, "tools": {"onnxruntime": "1.18.0", "onnx": "1.16.1"}},
        "bundle": {"path": "dist/digits-cnn-1.0.0-jetson-orin-nano.edgepack", "sha256": "e" * 64, "size_bytes": 61_234},
    }


def test_sample_report_is_well_formed_and_complete():
    report = sample_report()

    page = render_report_html(report)

    checker = check_page(page)
    assert checker.svg_count == 1
    assert sorted(p["data-variant"] for p in checker.points) == ["fp16", "fp32", "int8"]
    assert_finite_points(checker)
    for text in ("digits-cnn", "jetson-orin-nano", "PASS", "smallest and fastest", "size 0.18 MB &gt; 0.15 MB",
                 "Bubble area = size", "dist/digits-cnn-1.0.0-jetson-orin-nano.edgepack", "e" * 64, "1.18.0",
                 "avx512_vnni", "the target&#39;s tensor cores", "Latency on the target is estimated"):
        assert text in page
    assert "−0.30" in page  # accuracy delta in points, not in fraction units


def test_selected_variant_is_marked_in_table_and_chart():
    page = render_report_html(sample_report())

    checker = check_page(page)
    selected_rows = [r for r in checker.rows if "selected" in r.get("class", "").split()]
    assert [r["data-variant"] for r in selected_rows] == ["int8"]
    selected_points = [p for p in checker.points if "selected" in p["class"].split()]
    assert [p["data-variant"] for p in selected_points] == ["int8"]
    assert "★ selected" in page


def test_page_is_self_contained():
    page = render_report_html(sample_report())

    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_every_string_from_the_report_is_escaped():
    report = sample_report()
    evil = "<script>alert('x')</script>"
    report["name"] = evil
    report["variants"][0]["name"] = evil
    report["selected"] = evil
    report["notes"] = [evil]
    report["variants"][1]["failed_gates"] = [{"gate": evil, "message": evil}]
    report["sensitivity"] = {evil: [{"node": evil, "op_type": evil, "score": 0.1}]}
    report["lineage"]["tools"] = {evil: evil}

    page = render_report_html(report)

    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    checker = check_page(page)
    assert evil in [p["data-variant"] for p in checker.points]  # the parser unescapes the attribute back


def test_zero_variants():
    report = sample_report()
    report.update(variants=[], selected=None, sensitivity=None)
    report["gates"]["passed"] = False

    page = render_report_html(report)

    checker = check_page(page)
    assert checker.points == []
    assert "FAIL" in page and "No variant was selected" in page and "No variants to plot" in page


def test_single_variant():
    report = sample_report()
    report["variants"] = [report["variants"][2]]

    checker = check_page(render_report_html(report))

    assert [p["data-variant"] for p in checker.points] == ["int8"]
    assert_finite_points(checker)


def test_identical_latencies_and_sizes_do_not_divide_by_zero():
    report = sample_report()
    for v in report["variants"]:
        v.update(target_latency_ms=0.0, estimated_target_latency_ms=0.0, size_bytes=1000, accuracy=0.5)

    checker = check_page(render_report_html(report))

    assert len(checker.points) == 3
    assert_finite_points(checker)


def test_latency_spanning_more_than_ten_times_uses_a_log_axis():
    report = sample_report()
    report["variants"][0]["target_latency_ms"] = 3.0

    page = render_report_html(report)

    assert "log scale" in page
    assert_finite_points(check_page(page))


def test_agreement_metric_without_accuracies_plots_agreement():
    report = sample_report()
    report["metric"] = "agreement"
    for v in report["variants"]:
        v.update(metric="agreement", accuracy=None, accuracy_delta=None)

    page = render_report_html(report)

    checker = check_page(page)
    assert len(checker.points) == 3
    assert "agreement with reference" in page


def test_null_fields_render_as_dashes():
    report = sample_report()
    nulls = {key: None for key in variant("x")}
    report["variants"] = [dict(nulls, name="bare"), dict(nulls, name="half", accuracy=0.9, target_latency_ms=1.0)]
    for key in ("host", "gates", "reference", "lineage", "bundle", "passes", "notes", "duration_s", "selection_reason"):
        report[key] = None

    page = render_report_html(report)

    checker = check_page(page)
    assert [p["data-variant"] for p in checker.points] == ["half"]  # "bare" has nothing to plot
    assert "Not plotted: bare" in page
    assert "—" in page and "NO VERDICT" in page


@pytest.mark.parametrize("report", [{}, {"variants": "not a list"}, {"variants": [None, 3, "x"]},
                                    {"gates": [], "host": "x", "passes": [None], "sensitivity": {"int8": None}},
                                    {"variants": [{"name": "nan", "accuracy": float("nan"), "target_latency_ms": float("inf")}]}])
def test_malformed_reports_still_render(report):
    page = render_report_html(copy.deepcopy(report))

    assert_finite_points(check_page(page))


def test_write_report_html(tmp_path):
    path = tmp_path / "out" / "digits-cnn-1.0.0-jetson-orin-nano.report.html"

    write_report_html(sample_report(), path)

    assert check_page(path.read_text(encoding="utf-8")).svg_count == 1
