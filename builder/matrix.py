"""The combined report of a multi-profile build: profiles × variants (JSON + HTML).

Every entry is built from a typed `BuildReport`, or from the error of a profile whose build stopped
before it had a report (`error` set, no variants), so the matrix never reads a key a report lacks.
"""

from __future__ import annotations

from pathlib import Path

from builder.pages import render_matrix_html
from edgepack.report import BuildMatrix, BuildReport, MatrixProfile, MatrixVariant, Variant


def profile_entry(report: BuildReport | None, profile: str, exit_code: int, error: str | None = None) -> MatrixProfile:
    if report is None:
        return MatrixProfile(profile=profile, exit_code=exit_code, error=error, selected=None, variants=[])
    return MatrixProfile(
        profile=report.profile, exit_code=exit_code, error=None, selected=report.selected, selection_reason=report.selection_reason,
        runtime=report.runtime, bundle=report.bundle, variants=[_matrix_variant(v) for v in report.variants], notes=report.notes,
    )


def _matrix_variant(v: Variant) -> MatrixVariant:
    return MatrixVariant(
        name=v.name, runtime=v.runtime, format=v.format, precision=v.precision, accuracy=v.accuracy, accuracy_delta=v.accuracy_delta,
        size_bytes=v.size_bytes, host_p50_ms=v.latency_ms.p50, estimated_target_latency_ms=v.estimated_target_latency_ms,
        target_latency_ms=v.target_latency_ms, target_latency_source=v.target_latency_source, passed=v.passed, verified_in=v.verified_in,
        why_not=v.dropped_reason or "; ".join(g.message for g in v.failed_gates) or None,
    )


def make_matrix(name: str, version: str, entries: list[MatrixProfile], metric: str | None) -> BuildMatrix:
    return BuildMatrix(name=name, version=version, metric=metric, profiles=entries,
                       exit_code=max((e.exit_code for e in entries), default=0))


def write_matrix(matrix: BuildMatrix, out_dir: Path) -> tuple[Path, Path]:
    stem = f"{matrix.name}-{matrix.version}"
    json_path = out_dir / f"{stem}.matrix.json"
    html_path = out_dir / f"{stem}.matrix.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(matrix.to_json())
    html_path.write_text(render_matrix_html(matrix))
    return json_path, html_path
