"""The HTML build report and matrix pages: well-formed, self-contained, escaped, and robust to partial reports."""

from __future__ import annotations

import copy
import json
import math
import re
from html.parser import HTMLParser

import pytest

from builder.pages import render_matrix_html
from builder.report_html import render_report_html, write_report_html
from edgepack.report import BuildMatrix, BuildReport
from tests.builder.report_samples import sample_matrix, sample_report, variant

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


def test_typed_report_renders_the_page_its_json_file_renders():
    report = BuildReport.model_validate(sample_report())

    page = render_report_html(report)

    assert page == render_report_html(json.loads(report.to_json()))
    assert "★ selected" in page and "size 0.18 MB &gt; 0.15 MB" in page


def test_cached_latency_is_tagged():
    report = sample_report()  # fp32's latency came from the cache

    page = render_report_html(report)

    fp32_row = page[page.index('data-variant="fp32"'):page.index('data-variant="fp16"')]
    assert "latency reused from the build cache" in fp32_row
    assert page.count("latency reused from the build cache") == 1


class MatrixChecker(PageChecker):
    """Also collects the matrix rows (profile, variant, class) and the links to the profiles' reports."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix_rows: list[dict[str, str]] = []
        self.links: list[str] = []

    def _record(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super()._record(tag, attrs)
        attributes = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-profile" in attributes:
            self.matrix_rows.append(attributes)
        if tag == "a":
            self.links.append(attributes["href"])


def check_matrix(page: str) -> MatrixChecker:
    checker = MatrixChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert page.startswith("<!DOCTYPE html>")
    return checker


def test_matrix_has_a_row_per_profile_and_variant():
    page = render_matrix_html(sample_matrix())

    checker = check_matrix(page)
    rows = [(r["data-profile"], r.get("data-variant")) for r in checker.matrix_rows]
    assert rows == [("jetson-orin-nano", "fp32"), ("jetson-orin-nano", "fp16"), ("jetson-orin-nano", "int8"),
                    ("rpi4", "tflite-fp32"), ("rpi4", "tflite-dynamic-int8"), ("rpi4", "int8"), ("coral-devboard", None)]
    selected = [(r["data-profile"], r["data-variant"]) for r in checker.matrix_rows if "selected" in r["class"].split()]
    assert selected == [("jetson-orin-nano", "int8"), ("rpi4", "tflite-dynamic-int8")]
    failed = [r["data-variant"] for r in checker.matrix_rows if "fail" in r["class"].split()]
    assert failed == ["int8"]
    for text in ("-0.28", "+0.00", "79.9", "0.033", "0.137", "est.", "accuracy drop 1.25 pt &gt; 0.50 pt",
                 "error (exit 2): op Softmax is not supported by the Edge TPU compiler", "FAIL"):
        assert text in page


def test_matrix_links_each_built_profile_to_its_report():
    checker = check_matrix(render_matrix_html(sample_matrix()))

    assert checker.links == ["digits-cnn-1.0.0-jetson-orin-nano.report.html", "digits-cnn-1.0.0-rpi4.report.html"]


def test_typed_matrix_renders_the_page_its_json_file_renders():
    matrix = BuildMatrix.model_validate(sample_matrix())

    assert render_matrix_html(matrix) == render_matrix_html(json.loads(matrix.to_json()))


def test_matrix_escapes_every_string():
    matrix = sample_matrix()
    evil = "<script>alert('x')</script>"
    matrix["name"] = evil
    matrix["profiles"][0]["profile"] = evil
    matrix["profiles"][0]["variants"][0]["name"] = evil
    matrix["profiles"][1]["variants"][2]["why_not"] = evil
    matrix["profiles"][2]["error"] = evil

    page = render_matrix_html(matrix)

    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    check_matrix(page)


@pytest.mark.parametrize("matrix", [{}, {"profiles": "not a list"}, {"profiles": [None, 3]},
                                    {"profiles": [{"profile": "x", "variants": [None, {"accuracy_delta": float("nan")}]}]}])
def test_malformed_matrices_still_render(matrix):
    page = render_matrix_html(copy.deepcopy(matrix))

    check_matrix(page)
    assert "build matrix" in page
