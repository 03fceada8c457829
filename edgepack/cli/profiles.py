"""`edgepack profiles`: list the bundled hardware profiles, or show one (by name, alias or YAML path).

`edgepack profiles` and `edgepack profiles list` print a table; `edgepack profiles show NAME_OR_PATH` prints
every field of one profile. With `--json` each prints exactly one JSON document on stdout instead.
Problems are `ProfileError`s; the CLI shell turns them into one red line and exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table

from hardware_profiles import HardwareProfile, list_profiles, load_profile

app = typer.Typer(
    help="List the bundled hardware profiles, or show one in detail.",
    invoke_without_command=True,
    no_args_is_help=False,
)

JsonOption = typer.Option(False, "--json", help="Print one JSON document on stdout instead of a table.")


def _print_json(document: Any) -> None:
    # Plain stdout, not rich: rich would wrap long lines and colour the output, breaking the JSON.
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _si(value: float, unit: str) -> str:
    """1.28e12, "ops/s" -> "1.28T ops/s"."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{prefix} {unit}"
    return f"{value:g} {unit}"


def _accelerator_summary(profile: HardwareProfile) -> str:
    if not profile.accelerators:
        return "-"
    parts = []
    for accelerator in profile.accelerators:
        if accelerator.int8_tops is not None:
            rate = f"{accelerator.int8_tops:g} TOPS int8"
        elif accelerator.fp16_tflops is not None:
            rate = f"{accelerator.fp16_tflops:g} TFLOPS fp16"
        elif accelerator.fp32_tflops is not None:
            rate = f"{accelerator.fp32_tflops:g} TFLOPS fp32"
        else:
            rate = "rate unknown"
        parts.append(f"{accelerator.kind} {rate}")
    return "\n".join(parts)


def _runtime_summary(profile: HardwareProfile) -> str:
    # Names only, in order of preference; `show` lists providers, delegates and devices.
    return "\n".join(runtime.name for runtime in profile.runtimes)


def _profiles_table(profiles: list[HardwareProfile]) -> Table:
    table = Table(title="Hardware profiles", box=box.SIMPLE_HEAD, padding=(0, 1))
    # Values fold rather than vanish behind an ellipsis; lists go one item per line to keep columns narrow.
    for header, justify in (
        ("name", "left"), ("aliases", "left"), ("arch", "left"), ("cores", "right"), ("accelerator", "left"),
        ("runtimes", "left"), ("precisions", "left"), ("RAM", "right"),
    ):
        table.add_column(header, justify=justify, overflow="fold",
                         no_wrap=header in ("name", "arch", "RAM"), style="bold" if header == "name" else None)
    for profile in profiles:
        table.add_row(
            profile.name,
            "\n".join(profile.aliases) or "-",
            profile.arch,
            str(profile.cpu.cores),
            _accelerator_summary(profile),
            _runtime_summary(profile),
            "\n".join(profile.precisions),
            f"{profile.memory.ram_mb / 1024:g} GiB",
        )
    return table


def _print_list(as_json: bool) -> None:
    profiles = list_profiles()
    if as_json:
        _print_json([profile.model_dump(mode="json") for profile in profiles])
        return
    Console().print(_profiles_table(profiles))


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, (tuple, list)):
        if not value:
            return "-"
        # Long entries (sources) read better one per line.
        separator = "\n" if any(len(str(item)) > 40 for item in value) else ", "
        return separator.join(str(item) for item in value)
    if isinstance(value, dict):
        if not value:
            return "-"
        if key == "peak_ops_per_s":
            return ", ".join(f"{precision} {_si(ops, 'ops/s')}" for precision, ops in value.items())
        return "\n".join(f"{k}: {v}" for k, v in value.items())
    if value is None:
        return "-"
    return str(value)


def _section_table(title: str, model: BaseModel) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value")
    for key in type(model).model_fields:
        table.add_row(key, _format_value(key, getattr(model, key)))
    return table


def _items_table(title: str, items: tuple[BaseModel, ...]) -> Table | None:
    if not items:
        return None
    fields = list(type(items[0]).model_fields)
    table = Table(title=title, title_justify="left")
    for key in fields:
        table.add_column(key)
    for item in items:
        table.add_row(*(_format_value(key, getattr(item, key)) for key in fields))
    return table


def _print_details(profile: HardwareProfile) -> None:
    console = Console()
    top = Table(title=f"Profile {profile.name}", show_header=False, title_justify="left", box=None, padding=(0, 2))
    top.add_column("field", style="cyan", no_wrap=True)
    top.add_column("value")
    for key in ("name", "aliases", "description", "arch", "precisions", "toolchains", "sources"):
        top.add_row(key, _format_value(key, getattr(profile, key)))
    top.add_row("accelerators", "-" if not profile.accelerators else f"{len(profile.accelerators)} (below)")
    console.print(top)
    for title, model in (
        ("cpu", profile.cpu),
        ("opset", profile.opset),
        ("memory (MiB)", profile.memory),
        ("performance", profile.performance),
        ("default_gates", profile.default_gates),
    ):
        console.print()
        console.print(_section_table(title, model))
    for title, items in (("accelerators", profile.accelerators), ("runtimes (in order of preference)", profile.runtimes)):
        table = _items_table(title, items)
        if table is not None:
            console.print()
            console.print(table)


@app.callback()
def profiles(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List the bundled hardware profiles (same as `edgepack profiles list`)."""
    if ctx.invoked_subcommand is None:
        _print_list(as_json)


@app.command("list")
def list_command(as_json: bool = JsonOption) -> None:
    """List the bundled hardware profiles."""
    _print_list(as_json)


@app.command("show")
def show_command(
    name_or_path: str = typer.Argument(..., metavar="NAME_OR_PATH", help="Profile name, alias, or path to a profile YAML."),
    as_json: bool = JsonOption,
) -> None:
    """Show every field of one profile."""
    profile = load_profile(name_or_path)
    if as_json:
        _print_json(profile.model_dump(mode="json"))
        return
    _print_details(profile)
