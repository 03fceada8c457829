"""The combined report of a multi-profile build: profiles × variants (JSON + HTML)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


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


def render_matrix_html(matrix: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for entry in matrix["profiles"]:
        if entry["error"]:
            rows.append(f"<tr class='err'><td>{e(entry['profile'])}</td><td colspan='9'>error (exit {entry['exit_code']}): {e(entry['error'])}</td></tr>")
            continue
        for index, v in enumerate(entry["variants"]):
            selected = v["name"] == entry["selected"]
            delta = "—" if v["accuracy_delta"] is None else f"{v['accuracy_delta'] * (100 if matrix['metric'] == 'top1' else 1):+.2f}"
            target = f"{v['target_latency_ms']:.3g}" + (" est." if v["target_latency_source"] == "estimate" else "")
            status = "✓" if v["passed"] else e(v["why_not"] or "failed")
            cls = "sel" if selected else ("fail" if not v["passed"] else "")
            head = f"<td rowspan='{len(entry['variants'])}'><b>{e(entry['profile'])}</b><br><small>selected: {e(str(entry['selected']))}</small></td>" if index == 0 else ""
            rows.append(
                f"<tr class='{cls}'>{head}<td>{e(v['name'])}{' ★' if selected else ''}</td><td>{e(v['runtime'])}</td><td>{e(v['format'])}</td>"
                f"<td>{e(v['precision'])}</td><td class='n'>{delta}</td><td class='n'>{v['size_bytes'] / 1000:.1f}</td>"
                f"<td class='n'>{v['host_p50_ms']:.3f}</td><td class='n'>{e(target)}</td><td>{status}</td></tr>"
            )
    unit = "points" if matrix["metric"] == "top1" else matrix["metric"] or ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(matrix['name'])} {e(matrix['version'])} — build matrix</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#1d2330}}table{{border-collapse:collapse;width:100%}}
th,td{{border-bottom:1px solid #dde2ea;padding:6px 8px;text-align:left;vertical-align:top}}th{{background:#f3f5f9;font-size:12px;text-transform:uppercase;color:#5a6478}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}}tr.sel td{{background:#eaf1ff}}tr.fail td{{color:#8a3b3b}}tr.err td{{background:#fdecec}}small{{color:#5a6478}}</style></head>
<body><h1>{e(matrix['name'])} {e(matrix['version'])} — build matrix</h1>
<p>One row per variant and profile. Δ accuracy is against fp32 ({e(unit)}); host p50 is measured on the build host; the target column is
measured when the host has the target's ISA, else estimated from the profile's performance model (est.). ★ = the variant in the profile's bundle.</p>
<table><thead><tr><th>profile</th><th>variant</th><th>runtime</th><th>format</th><th>precision</th><th>Δ accuracy</th><th>size kB</th><th>host p50 ms</th><th>target ms</th><th>gates</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></body></html>
"""


def write_matrix(matrix: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    stem = f"{matrix['name']}-{matrix['version']}"
    json_path = out_dir / f"{stem}.matrix.json"
    html_path = out_dir / f"{stem}.matrix.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(matrix, indent=2, default=str) + "\n")
    html_path.write_text(render_matrix_html(matrix))
    return json_path, html_path
