"""The `edgepack` command line: the root that mounts each component's commands.

    edgepack build                      builder/cli.py        needs the builder extra
    edgepack fleet|devices|rollout|tokens …  fleet/cli/       needs the fleet extra
    edgepack agent run|status           device_agent/cli.py   needs the agent extra
    edgepack testbed list|run           testbeds/cli.py       needs builder, fleet and agent
    edgepack profiles|keys|certs|bundle|schema  edgepack/cli/ the shared contracts: core install only

A component's CLI module imports only typer, rich and edgepack's core, and declares the extras its
commands need (`EXTRAS`); its heavy imports happen inside the commands. So `edgepack --help` lists
every command whatever is installed, and a command whose extra is missing ends in one line naming it.

Errors are translated here and nowhere else: an `EdgepackError` becomes one red line on stderr and
the error's exit code (2 bad input, 1 gate or verification failed); `--debug` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.markup import escape

from edgepack import __version__
from edgepack.cli.extras import missing_extra
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


@dataclass(frozen=True)
class Mount:
    """One name under `edgepack`: a component's Typer app (a group) or a single command function."""

    name: str
    module: str
    attribute: str = "app"


MOUNTS = (
    Mount("build", "builder.cli", "build"),
    Mount("profiles", "edgepack.cli.profiles"),
    Mount("keys", "edgepack.cli.keys"),
    Mount("certs", "edgepack.cli.certs"),
    Mount("bundle", "edgepack.cli.bundle"),
    Mount("schema", "edgepack.cli.schema"),
    Mount("fleet", "fleet.cli.server"),
    Mount("devices", "fleet.cli.devices"),
    Mount("rollout", "fleet.cli.rollout"),
    Mount("tokens", "fleet.cli.tokens"),
    Mount("agent", "device_agent.cli"),
    Mount("testbed", "testbeds.cli"),
)
# Name under `edgepack` → the extras its commands need (the component's EXTRAS; none for the shared contracts).
_extras: dict[str, tuple[str, ...]] = {}


def _component_extras(module_name: str) -> tuple[str, ...]:
    """A component module's EXTRAS, or its package's (fleet/cli/__init__.py declares them for all three)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "EXTRAS"):
        return tuple(module.EXTRAS)
    package = importlib.import_module(module_name.rpartition(".")[0]) if "." in module_name else None
    return tuple(getattr(package, "EXTRAS", ()))


def _register() -> None:
    for mount in MOUNTS:
        target = getattr(importlib.import_module(mount.module), mount.attribute)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=mount.name)
        else:
            app.command(mount.name)(target)
        _extras[mount.name] = _component_extras(mount.module)


_register()


def _command_path(args: list[str]) -> list[str]:
    """The command names in `args` (['fleet', 'serve'] for `fleet serve --port 1`), walking the mounted groups."""
    import typer.main

    command = typer.main.get_command(app)
    path: list[str] = []
    for arg in args:
        if arg.startswith("-"):
            continue  # the groups' own options are flags (--debug, --json): none takes a value
        commands = getattr(command, "commands", None)
        if not commands or arg not in commands:
            break
        command = commands[arg]
        path.append(arg)
    return path


def _print_error(error: EdgepackError) -> None:
    # Escaped: messages hold brackets ("pip install 'edgepack[fleet]'") that rich would read as markup and drop.
    err_console.print(f"[bold red]error:[/bold red] {escape(error.message)}", highlight=False, soft_wrap=True)
    sys.exit(error.exit_code)


def _internal_error(exc: BaseException) -> None:
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    err_console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(detail)} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
    sys.exit(1)


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
        _print_error(exc)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # a bug or an unexpected failure: still one line unless --debug
        if debug:
            raise
        path = _command_path(args)
        extra = missing_extra(exc, " ".join(["edgepack", *path]), _extras.get(path[0], ()) if path else ()) \
            if isinstance(exc, ImportError) else None
        if extra is not None:
            _print_error(extra)  # the command's extra is not installed: say which to install
        _internal_error(exc)
