"""`edgepack build`: quantize, verify, benchmark and package a model for a hardware profile."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True, highlight=False, soft_wrap=True)


class _RichProgress:
    """Live progress on stderr: a spinner for the running step, one line per finished step."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._status = None
        self._started: dict[str, float] = {}

    def start(self, task: str) -> None:
        self._started[task] = time.perf_counter()
        if self.enabled:
            if self._status is None:
                self._status = console.status(f"{task} …")
                self._status.start()
            else:
                self._status.update(f"{task} …")

    def finish(self, task: str, detail: str = "", cached: bool = False) -> None:
        if self.enabled:
            tag = " [dim](cached)[/dim]" if cached else ""
            console.print(f"  [green]✓[/green] {task}  [dim]{detail}[/dim]{tag}")

    def note(self, message: str) -> None:
        if self.enabled:
            console.print(f"  [yellow]![/yellow] {message}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _summary(report: dict) -> Table:
    table = Table(title=f"{report['name']} {report['version']} → {report['profile']} ({report['metric']}; ~ = estimated on the target)",
                  title_justify="left")
    for column in ("variant", "KB", "accuracy", "Δ", "agree", "host p50 ms", "target ms", "gates"):
        table.add_column(column, justify="right" if column not in ("variant", "gates") else "left")
    for v in report["variants"]:
        marker = " ★" if v["name"] == report["selected"] else ""
        target = ("~" if v["target_latency_source"] == "estimate" else "") + f"{v['target_latency_ms']:.3g}"
        gates = "[green]pass[/green]" if v["passed"] else "[red]" + ", ".join(g["gate"] for g in v["failed_gates"]) + "[/red]"
        table.add_row(
            v["name"] + marker, f"{v['size_bytes'] / 1024:.1f}", f"{v['accuracy']:.4f}", f"{v['accuracy_delta']:+.4f}",
            f"{v['agreement']:.3f}", f"{v['latency_ms']['p50']:.3f}", target, gates,
        )
    return table


def build(
    profile: str = typer.Option(..., "--profile", "-p", help="Hardware profile name, alias (jetson) or path to a profile YAML."),
    config: Path = typer.Option(Path("edgepack.yaml"), "--config", "-c", help="Build config."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model to build instead of the config's `model`."),
    out: Path = typer.Option(Path("dist"), "--out", "-o", help="Output folder for the bundle and reports."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (else $EDGEPACK_SIGNING_KEY, ./keys/edgepack.key, a dev key)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Build cache folder (default $EDGEPACK_CACHE_DIR or ~/.cache/edgepack)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every pass and measurement."),
    json_output: bool = typer.Option(False, "--json", help="Print the report JSON on stdout (progress stays on stderr)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Build a model for a hardware profile: variants, verification, latency, selection, signed bundle."""
    from builder.pipeline import BuildRequest, run_build

    if "--debug" not in sys.argv:
        # onnxruntime's quantization tools log advice through the root logger; the report carries what matters.
        logging.getLogger().setLevel(logging.ERROR)
    progress = _RichProgress(enabled=not quiet)
    request = BuildRequest(config_path=config, profile=profile, out_dir=out, model_override=model,
                           signing_key=signing_key, cache_dir=cache_dir, use_cache=not no_cache)
    try:
        result = run_build(request, progress)
    finally:
        progress.close()
    report = result.report
    if result.dev_key_created:
        console.print(f"[yellow]signed with a development key[/yellow] {result.signing_key_path} "
                      "(create a real one with `edgepack keys generate keys/`)")
    if json_output:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    if not quiet:
        console.print(_summary(report))
        for note in report["notes"]:
            console.print(f"[yellow]note:[/yellow] {note}")
    if report["selected"]:
        console.print(f"[bold green]selected {report['selected']}[/bold green]: {report['selection_reason']}")
        console.print(f"bundle: {report['bundle']['path']}  sha256 {report['bundle']['sha256'][:16]}…")
    else:
        console.print(f"[bold red]no variant passed[/bold red]: {report['selection_reason']}")
    stem = Path(result.outputs[-1]).with_suffix("").with_suffix("")
    console.print(f"report: {stem}.report.json and {stem}.report.html")
    raise typer.Exit(result.exit_code)
