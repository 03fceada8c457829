"""The report and matrix pages as a browser shows them: headless Chromium (Debian's package) through Playwright.

Checks what reading the HTML cannot: the page loads with no console error and no request beyond itself, the
inlined stylesheet applies, every section is laid out, nothing overflows sideways at laptop or tablet width,
and a hostile variant name shows up as text instead of running.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder.pages import render_matrix_html
from builder.report_html import write_report_html
from tests.builder.report_samples import HOSTILE, sample_matrix, sample_report

# A browser is a process beside the test.
pytestmark = pytest.mark.e2e

LAPTOP = {"width": 1366, "height": 768}  # the most common laptop screen
TABLET = {"width": 820, "height": 1180}
REPORT_SECTIONS = ("summary", "why", "variants", "chart", "quantization", "sensitivity", "gates", "host", "lineage", "passes")


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium on PATH: install Debian's `chromium` package (`make test` does)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path())
        yield instance
        instance.close()


@dataclass
class LoadedPage:
    page: object
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def evaluate(self, script: str, arg: object = None) -> object:
        return self.page.evaluate(script, arg)


def open_page(browser: object, path: Path, viewport: dict[str, int]) -> LoadedPage:
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    loaded = LoadedPage(page)
    page.on("console", lambda message: loaded.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: loaded.console_errors.append(str(error)))
    page.on("request", lambda request: loaded.requests.append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    return loaded


def hostile_report() -> dict:
    report = sample_report()
    report["variants"][1]["name"] = HOSTILE
    report["variants"][1]["notes"] = [HOSTILE]
    report["notes"].append(HOSTILE)
    return report


def hostile_matrix() -> dict:
    matrix = sample_matrix()
    matrix["profiles"][0]["variants"][1]["name"] = HOSTILE
    matrix["profiles"][2]["error"] = HOSTILE
    return matrix


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pages")
    paths = {
        "report": folder / "digits-cnn-1.0.0-jetson-orin-nano.report.html",
        "hostile-report": folder / "hostile.report.html",
        "matrix": folder / "digits-cnn-1.0.0.matrix.html",
        "hostile-matrix": folder / "hostile.matrix.html",
    }
    write_report_html(sample_report(), paths["report"])
    write_report_html(hostile_report(), paths["hostile-report"])
    paths["matrix"].write_text(render_matrix_html(sample_matrix()), encoding="utf-8")
    paths["hostile-matrix"].write_text(render_matrix_html(hostile_matrix()), encoding="utf-8")
    return paths


def overflow(loaded: LoadedPage) -> dict:
    """How far the document is wider than the window (0 when it fits), and which elements stick out."""
    return loaded.evaluate(
        """() => {
            const width = document.documentElement.clientWidth;
            const outside = [...document.querySelectorAll('body *')]
                .filter(e => !e.closest('.table-scroll') && e.getBoundingClientRect().right > width + 1)
                .map(e => e.tagName + (e.className && typeof e.className === 'string' ? '.' + e.className : ''));
            return {excess: document.documentElement.scrollWidth - width, outside: outside.slice(0, 5)};
        }"""
    )


@pytest.mark.parametrize("name", ["report", "hostile-report", "matrix", "hostile-matrix"])
@pytest.mark.parametrize("viewport", [LAPTOP, TABLET], ids=["laptop", "tablet"])
def test_page_loads_clean_and_fits_the_width(browser, pages, name, viewport):
    loaded = open_page(browser, pages[name], viewport)

    assert loaded.console_errors == []
    assert loaded.requests == [pages[name].as_uri()]  # self-contained: nothing fetched beyond the file itself
    assert overflow(loaded) == {"excess": 0, "outside": []}
    # The inlined stylesheet is the one in force: sections are cards.
    assert loaded.evaluate("getComputedStyle(document.querySelector('section')).borderTopLeftRadius") == "12px"


@pytest.mark.parametrize("viewport", [LAPTOP, TABLET], ids=["laptop", "tablet"])
def test_every_report_section_is_laid_out(browser, pages, viewport):
    loaded = open_page(browser, pages["report"], viewport)

    heights = dict(zip(REPORT_SECTIONS, loaded.evaluate(
        "ids => ids.map(id => { const e = document.getElementById(id); return e ? e.getBoundingClientRect().height : 0; })",
        list(REPORT_SECTIONS),
    )))

    assert all(height > 40 for height in heights.values()), heights  # present, and more than an empty card
    toc = loaded.evaluate("[...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href').slice(1))")
    assert set(toc) <= set(REPORT_SECTIONS)
    circles = loaded.evaluate("[...document.querySelectorAll('svg.chart circle[data-variant]')].map(c => c.dataset.variant)")
    assert sorted(circles) == ["fp16", "fp32", "int8"]
    svg_width = loaded.evaluate("document.querySelector('svg.chart').getBoundingClientRect().width")
    assert 0 < svg_width <= viewport["width"]


def test_variants_table_fits_a_laptop_without_scrolling(browser, pages):
    loaded = open_page(browser, pages["report"], LAPTOP)

    scroll = loaded.evaluate("(() => { const e = document.querySelector('table.variants').parentElement; return [e.scrollWidth, e.clientWidth]; })()")

    assert scroll[0] <= scroll[1]


def test_matrix_shows_every_profile_and_variant(browser, pages):
    loaded = open_page(browser, pages["matrix"], LAPTOP)

    rows = loaded.evaluate("[...document.querySelectorAll('table.matrix tbody tr')].map(r => [r.dataset.profile, r.dataset.variant || null, r.getBoundingClientRect().height > 0])")
    cells = loaded.evaluate("document.querySelector('table.matrix').innerText")

    expected = [(p["profile"], v["name"]) for p in sample_matrix()["profiles"] for v in p["variants"]] + [("coral-devboard", None)]
    assert [(r[0], r[1]) for r in rows] == expected
    assert all(r[2] for r in rows)
    assert "error (exit 2): op Softmax is not supported by the Edge TPU compiler" in cells
    assert "accuracy drop 1.25 pt > 0.50 pt" in cells


@pytest.mark.parametrize("name", ["hostile-report", "hostile-matrix"])
def test_hostile_variant_name_is_text_not_markup(browser, pages, name):
    loaded = open_page(browser, pages[name], LAPTOP)

    assert loaded.evaluate("typeof window.__pwned") == "undefined"
    assert loaded.evaluate("document.querySelectorAll('script, img').length") == 0
    shown = loaded.evaluate("document.body.innerText")
    assert HOSTILE in shown  # rendered as the literal characters
    marked = loaded.evaluate("[...document.querySelectorAll('[data-variant]')].map(e => e.dataset.variant)")
    assert HOSTILE in marked


def test_hostile_report_still_has_every_section(browser, pages):
    loaded = open_page(browser, pages["hostile-report"], TABLET)

    present = loaded.evaluate("ids => ids.filter(id => document.getElementById(id))", list(REPORT_SECTIONS))

    assert present == list(REPORT_SECTIONS)
    assert loaded.console_errors == []
