"""The `edgepack` command line.

Errors are translated here and nowhere else: an `EdgepackError` becomes one red line on stderr and
the error's exit code (2 bad input, 1 gate or verification failed); `--debug` shows the traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from edgepack import __version__
from edgepack.errors import EdgepackError

app = typer.Typer(
    name="edgepack",
    help="Build ML models for edge hardware, package signed bundles, roll them out to fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgepack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def _register() -> None:
    # Imported here so each command module stays independent; none imports heavy backends at import time.
    from builder import cli as build
    from edgepack.cli import agent, bundle, devices, fleet, keys, profiles, rollout, testbed

    app.command("build")(build.build)
    app.add_typer(profiles.app, name="profiles")
    app.add_typer(keys.app, name="keys")
    app.add_typer(bundle.app, name="bundle")
    app.add_typer(fleet.app, name="fleet")
    app.add_typer(devices.app, name="devices")
    app.add_typer(rollout.app, name="rollout")
    app.add_typer(agent.app, name="agent")
    app.add_typer(testbed.app, name="testbed")


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: typer handles usage errors (exit 2) and --help itself and calls sys.exit.
        app(args=args, prog_name="edgepack")
    except EdgepackError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # a bug or an unexpected failure: still one line unless --debug
        if debug:
            raise
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        err_console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {detail} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        sys.exit(1)
