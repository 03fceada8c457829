"""The combined report of a multi-profile build: profiles × variants (JSON + HTML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.pages import render_matrix_html


def profile_entry(report: dict[str, Any] | None, profile: str, exit_code: int, error: str | None = None) -> dict[str, Any]:
    if report is None:
        return {"profile": profile, "exit_code": exit_code, "error": error, "selected": None, "variants": []}
    variants = []
    for v in report["variants"]:
        variants.append({
            "name": v["name"], "runtime": v["runtime"], "format": v["format"], "precision": v["precision"],
            "accuracy": v.get("accuracy"), "accuracy_delta": v.get("accuracy_delta"), "size_bytes": v["size_bytes"],
            "host_p50_ms": v["latency_ms"]["p50"], "estimated_target_latency_ms": v["estimated_target_latency_ms"],
            "target_latency_ms": v["target_latency_ms"], "target_latency_source": v["target_latency_source"],
            "passed": v["passed"], "verified_in": v.get("verified_in"),
            "why_not": v.get("dropped_reason") or "; ".join(g["message"] for g in v.get("failed_gates", [])) or None,
        })
    return {
        "profile": report["profile"], "exit_code": exit_code, "error": None, "selected": report["selected"],
        "selection_reason": report["selection_reason"], "runtime": report.get("runtime"),
        "bundle": report.get("bundle"), "variants": variants, "notes": report.get("notes", []),
    }


def make_matrix(name: str, version: str, entries: list[dict[str, Any]], metric: str | None) -> dict[str, Any]:
    return {"schema_version": 1, "name": name, "version": version, "metric": metric, "profiles": entries,
            "exit_code": max((e["exit_code"] for e in entries), default=0)}


def write_matrix(matrix: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    stem = f"{matrix['name']}-{matrix['version']}"
    json_path = out_dir / f"{stem}.matrix.json"
    html_path = out_dir / f"{stem}.matrix.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(matrix, indent=2, default=str) + "\n")
    html_path.write_text(render_matrix_html(matrix))
    return json_path, html_path
