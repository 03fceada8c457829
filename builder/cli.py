"""`edgepack build`: quantize, verify, benchmark and package a model for a hardware profile."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from edgepack.report import BuildReport

console = Console(stderr=True, highlight=False, soft_wrap=True)
# The extras this command needs; the root CLI names them when one of their modules is missing.
EXTRAS = ("builder",)


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


def _summary(report: BuildReport) -> Table:
    table = Table(title=f"{report.name} {report.version} → {report.profile} ({report.metric}; ~ = estimated on the target)",
                  title_justify="left")
    for column in ("variant", "KB", "accuracy", "Δ", "agree", "host p50 ms", "target ms", "gates"):
        table.add_column(column, justify="right" if column not in ("variant", "gates") else "left")
    for v in report.variants:
        marker = " ★" if v.name == report.selected else ""
        target = ("~" if v.target_latency_source == "estimate" else "") + f"{v.target_latency_ms:.3g}"
        gates = "[green]pass[/green]" if v.passed else "[red]" + ", ".join(g.gate for g in v.failed_gates) + "[/red]"
        table.add_row(
            v.name + marker, f"{v.size_bytes / 1024:.1f}", f"{v.accuracy:.4f}", f"{v.accuracy_delta:+.4f}",
            f"{v.agreement:.3f}", f"{v.latency_ms.p50:.3f}", target, gates,
        )
    return table


def build(
    profile: Optional[list[str]] = typer.Option(None, "--profile", "-p", help="Hardware profile name, alias (jetson) or path to a profile YAML; repeat for several."),
    all_profiles: bool = typer.Option(False, "--all-profiles", help="Build for every bundled profile."),
    config: Path = typer.Option(Path("edgepack.yaml"), "--config", "-c", help="Build config."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model to build instead of the config's `model`."),
    out: Path = typer.Option(Path("dist"), "--out", "-o", help="Output folder for the bundle and reports."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (else $EDGEPACK_SIGNING_KEY, ./keys/edgepack.key, a dev key)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Build cache folder (default $EDGEPACK_CACHE_DIR or ~/.cache/edgepack)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every pass and measurement."),
    json_output: bool = typer.Option(False, "--json", help="Print the report JSON on stdout (the matrix for several profiles)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    toolchain: str = typer.Option("none", "--toolchain", help="none | docker: run vendor steps (edgetpu_compiler, trtexec) in the profile's container images."),
    time_budget: str = typer.Option("15m", "--time-budget", help="Time for each profile's build (90s, 15m, 1h, or `none`): past it the slow optional steps (accuracy fallback builds, OpenVINO accuracy control) are skipped and the report says so."),
) -> None:
    """Build a model for hardware profiles: variants, verification, latency, selection, signed bundle."""
    from builder.pipeline import BuildRequest, run_build
    from edgepack.durations import parse_duration
    from edgepack.errors import ConfigError, EdgepackError

    if "--debug" not in sys.argv:
        # onnxruntime's quantization tools log advice through the root logger; the report carries what matters.
        logging.getLogger().setLevel(logging.ERROR)
    if toolchain not in ("none", "docker"):
        raise ConfigError(f"--toolchain must be none or docker, not {toolchain!r}")
    budget_s = None if time_budget.strip().lower() == "none" else parse_duration(time_budget)
    if all_profiles:
        from hardware_profiles import list_profiles

        profiles = [p.name for p in list_profiles()]
    else:
        profiles = list(profile or [])
    if not profiles:
        raise ConfigError("name a profile with --profile NAME (repeatable) or use --all-profiles; `edgepack profiles` lists them")
    if len(profiles) == 1:
        result = _build_one(BuildRequest(config_path=config, profile=profiles[0], out_dir=out, model_override=model,
                                         signing_key=signing_key, cache_dir=cache_dir, use_cache=not no_cache, toolchain=toolchain,
                               time_budget_s=budget_s), quiet, json_output)
        raise typer.Exit(result.exit_code)

    from builder.matrix import make_matrix, profile_entry, write_matrix

    entries, name, version, metric = [], None, None, None
    for index, profile_name in enumerate(profiles, 1):
        console.rule(f"[bold]{profile_name}[/bold] ({index}/{len(profiles)})")
        request = BuildRequest(config_path=config, profile=profile_name, out_dir=out, model_override=model,
                               signing_key=signing_key, cache_dir=cache_dir, use_cache=not no_cache, toolchain=toolchain,
                               time_budget_s=budget_s)
        try:
            result = _build_one(request, quiet, json_output=False)
        except EdgepackError as exc:
            # One profile's bad fit (an op its runtime lacks) must not stop the others.
            console.print(f"[bold red]error:[/bold red] {profile_name}: {exc.message}")
            entries.append(profile_entry(None, profile_name, exc.exit_code, exc.message))
            continue
        name, version, metric = result.report.name, result.report.version, result.report.metric
        entries.append(profile_entry(result.report, profile_name, result.exit_code))
    if name is None:
        from edgepack.config import load_build_config

        loaded = load_build_config(config)
        name, version, metric = loaded.name, loaded.version, loaded.metric
    matrix = make_matrix(name, version, entries, metric)
    json_path, html_path = write_matrix(matrix, out)
    table = Table(title=f"{name} {version}: {len(profiles)} profiles", title_justify="left")
    for column in ("profile", "selected", "runtime", "Δ", "KB", "target ms", "exit"):
        table.add_column(column)
    for entry in entries:
        chosen = entry.selected_variant
        if chosen:
            delta = chosen.accuracy_delta
            table.add_row(entry.profile, chosen.name, chosen.runtime, f"{delta:+.4f}" if delta is not None else "—",
                          f"{chosen.size_bytes / 1024:.0f}", ("~" if chosen.target_latency_source == "estimate" else "") + f"{chosen.target_latency_ms:.3g}",
                          str(entry.exit_code))
        else:
            table.add_row(entry.profile, "—", "—", "—", "—", "—", f"{entry.exit_code} {entry.error or 'no variant passed'}")
    console.print(table)
    console.print(f"matrix: {json_path} and {html_path}")
    if json_output:
        sys.stdout.write(matrix.to_json())
    raise typer.Exit(matrix.exit_code)


def _build_one(request, quiet: bool, json_output: bool):
    from builder.pipeline import run_build

    progress = _RichProgress(enabled=not quiet)
    try:
        result = run_build(request, progress)
    finally:
        progress.close()
    report = result.report
    if result.dev_key_created:
        console.print(f"[yellow]signed with a development key[/yellow] {result.signing_key_path} "
                      "(create a real one with `edgepack keys generate keys/`)")
    if json_output:
        sys.stdout.write(report.to_json())
    if not quiet:
        console.print(_summary(report))
        for failed in report.failed_variants:
            console.print(f"[red]✗[/red] {failed.line()}")
        for note in report.notes:
            console.print(f"[yellow]note:[/yellow] {note}")
    for step in report.cut_short:
        console.print(f"[yellow]cut short[/yellow]: {step}")
    for step in report.toolchain or []:
        console.print(f"toolchain {step.step}: {step.status}: {step.message}")
    if report.selected and report.bundle:
        console.print(f"[bold green]selected {report.selected}[/bold green]: {report.selection_reason}")
        console.print(f"bundle: {report.bundle.path}  sha256 {report.bundle.sha256[:16]}…")
    else:
        console.print(f"[bold red]no variant passed[/bold red]: {report.selection_reason}")
    stem = f"{report.name}-{report.version}-{report.profile}"
    console.print(f"report: {request.out_dir / (stem + '.report.json')} and {request.out_dir / (stem + '.report.html')}")
    return result
