"""HTML pages of the builder (build report, build matrix), rendered from the Jinja2 templates in
`builder/report_templates/`: one base template, one stylesheet, autoescape on.

Every page is one self-contained file: the stylesheet is inlined and nothing is loaded from the network,
so a page opens offline, as a CI artifact or as a mail attachment.

Templates read report data with attribute syntax (`report.variants`, `variant.accuracy_delta`). Reports
come from failed and partial builds too, so the data is read leniently: a missing field, or a field of
an object that is not one, reads as None and the formatting filters render it as an em dash. Names the
templates look up in their context (and fields of the Python objects this package builds, such as the
chart geometry) are strict: a typo there is an error when the page renders, not a blank cell.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel

__all__ = ["MISSING", "as_data", "as_list", "as_mapping", "number", "render_matrix_html", "render_page"]

MISSING = "—"
STYLESHEET = "edgepack.css"
# Metrics reported as a fraction in [0, 1] where one point is 0.01 (accuracy_delta is in these units).
FRACTION_METRICS = frozenset({"top1", "top5", "accuracy"})
_DATA_TYPES = (str, int, float, bool, list, tuple, type(None))


class _PageEnvironment(Environment):
    """Reads fields of report data leniently (see the module docstring) and everything else strictly."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            return obj.get(attribute)  # a field, never a dict method: a report may have a field named "items"
        if isinstance(obj, _DATA_TYPES):
            return None  # `gates.passed` where the report's gates are a list, a string or null
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Mapping):
            return obj.get(argument)
        return super().getitem(obj, argument)


def render_page(template: str, **context: Any) -> str:
    """Render one page template with the shared stylesheet inlined."""
    return _environment().get_template(template).render(stylesheet=_stylesheet(), **context)


def render_matrix_html(matrix: BaseModel | Mapping[str, Any]) -> str:
    """The combined report of a multi-profile build (profiles × variants) as one HTML document."""
    data = as_data(matrix)
    profiles = [_matrix_profile(as_mapping(entry), data) for entry in as_list(data.get("profiles"))]
    exit_code = data.get("exit_code")
    passed = None if isinstance(exit_code, bool) or not isinstance(exit_code, int) else exit_code == 0
    return render_page("matrix.html", matrix=data, profiles=profiles, passed=passed)


@dataclasses.dataclass(frozen=True)
class MatrixProfile:
    """One profile's rows of the matrix table."""

    entry: Mapping[str, Any]
    variants: list[Mapping[str, Any]]
    selected: Any
    is_selected: list[bool]
    report_file: str | None  # the profile's own report page, written beside the matrix; None when it failed early


def _matrix_profile(entry: Mapping[str, Any], matrix: Mapping[str, Any]) -> MatrixProfile:
    variants = records(entry.get("variants"))
    selected = entry.get("selected")
    parts = (matrix.get("name"), matrix.get("version"), entry.get("profile"))
    has_report = not entry.get("error") and all(isinstance(part, str) and part for part in parts)
    return MatrixProfile(entry, variants, selected, [selected is not None and v.get("name") == selected for v in variants],
                         "-".join(parts) + ".report.html" if has_report else None)


# ---------------------------------------------------------------------------------------------------
# Data


def as_data(value: Any) -> Mapping[str, Any]:
    """The report (or matrix) as JSON-shaped data: a pydantic model is dumped as its JSON file carries it."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return as_mapping(value)


def as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def is_fraction_metric(metric: Any) -> bool:
    return metric in FRACTION_METRICS


# ---------------------------------------------------------------------------------------------------
# Filters: every one takes any value and returns plain text (autoescaping escapes it), MISSING for none.


def dash(value: Any) -> Any:
    return MISSING if value is None or value == "" else value


def records(value: Any) -> list[Mapping[str, Any]]:
    """A list field whose items are objects; an item that is not one reads as an empty object."""
    return [as_mapping(item) for item in as_list(value)]


def texts(value: Any) -> list[Any]:
    """A list field of texts (notes, node names), without null or empty entries."""
    return [item for item in as_list(value) if item not in (None, "")]


def pairs(value: Any) -> list[tuple[Any, Any]]:
    return list(as_mapping(value).items())


def with_unit(text: str, unit: str) -> str:
    return text if text == MISSING else f"{text} {unit}"


def fmt_fixed(value: Any, decimals: int) -> str:
    n = number(value)
    return MISSING if n is None else f"{n:,.{decimals}f}"


def fmt_significant(value: Any, digits: int = 4) -> str:
    n = number(value)
    return MISSING if n is None else f"{n:.{digits}g}"


def fmt_int(value: Any) -> str:
    n = number(value)
    return MISSING if n is None else f"{n:,.0f}"


def fmt_fraction(value: Any) -> str:
    n = number(value)
    return MISSING if n is None else f"{n * 100:.2f}%"


def fmt_metric(value: Any, metric: Any) -> str:
    return fmt_fraction(value) if is_fraction_metric(metric) else fmt_significant(value)


def plain_metric(value: float, percent: bool) -> str:
    return f"{value * 100:.2f}%" if percent else f"{value:.4g}"


def fmt_delta(value: Any, metric: Any, unit: bool = True) -> str:
    n = number(value)
    if n is None:
        return MISSING
    if is_fraction_metric(metric):  # one point = 0.01 of a fraction metric
        return _signed(n, f"{abs(n) * 100:.2f}") + (" pt" if unit else "")
    return _signed(n, f"{abs(n):.4g}")


def _signed(value: float, text: str) -> str:
    if value == 0:
        return text
    return ("−" if value < 0 else "+") + text


def fmt_ratio(value: Any) -> str:
    n = number(value)
    return MISSING if n is None else f"{n:.2f}×"


def fmt_kb(size: Any) -> str:
    n = number(size)
    return MISSING if n is None else f"{n / 1000:,.1f}"


def fmt_bytes(size: Any) -> str:
    n = number(size)
    if n is None:
        return MISSING
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def fmt_ms(value: Any) -> str:
    n = number(value)
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


def fmt_duration(value: Any) -> str:
    n = number(value)
    if n is None:
        return MISSING
    if n < 60:
        return f"{n:.1f} s"
    minutes, seconds = divmod(round(n), 60)
    return f"{minutes} min {seconds:02d} s"


def fmt_sparsity(value: Any) -> str:
    n = number(value)
    if n is not None:
        return f"{n * 100:.0f}%"
    if isinstance(value, Mapping):
        sparsity = number(value.get("sparsity"))
        pattern = value.get("pattern")
        text = f"{sparsity * 100:.0f}%" if sparsity is not None else MISSING
        return text + (f" ({pattern})" if pattern else "")
    return str(dash(value))


def fmt_threshold(value: Any, gate: str, metric: Any) -> str:
    n = number(value)
    if n is None:
        return str(dash(value))
    if gate == "max_accuracy_drop" and is_fraction_metric(metric):
        return f"{n:g} ({n * 100:.2f} pt)"
    if gate.endswith("_ms"):
        return f"{n:g} ms"
    if gate.endswith("_mb"):
        return f"{n:g} MB"
    if gate == "min_agreement":
        return f"{n * 100:.2f}%"
    return f"{n:g}"


def fmt_value(value: Any) -> str:
    """Any JSON value as one line of text: lists and objects comma-separated."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return fmt_significant(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt_value(v)}" for k, v in value.items()) or MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value) or MISSING
    return str(value)


def fmt_px(value: float) -> str:
    """A chart coordinate: a tenth of a pixel is finer than any screen shows."""
    return f"{value:.1f}"


def field_label(key: Any) -> str:
    return str(key).replace("_", " ")


_FILTERS = {
    "dash": dash, "records": records, "texts": texts, "pairs": pairs, "with_unit": with_unit,
    "fixed": fmt_fixed, "significant": fmt_significant, "int": fmt_int, "fraction": fmt_fraction,
    "metric": fmt_metric, "delta": fmt_delta, "ratio": fmt_ratio, "kb": fmt_kb, "bytes": fmt_bytes,
    "ms": fmt_ms, "duration": fmt_duration, "sparsity": fmt_sparsity, "threshold": fmt_threshold,
    "value": fmt_value, "px": fmt_px, "field_label": field_label, "number": number,
}


@lru_cache(maxsize=1)
def _environment() -> Environment:
    environment = _PageEnvironment(
        loader=PackageLoader("builder", "report_templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(_FILTERS)
    environment.tests["fraction_metric"] = is_fraction_metric
    return environment


@lru_cache(maxsize=1)
def _stylesheet() -> Markup:
    # Our own file, read as is: Markup keeps autoescape from touching the CSS (a `>` selector, quotes in fonts).
    return Markup(resources.files("builder").joinpath("report_templates", STYLESHEET).read_text(encoding="utf-8"))
