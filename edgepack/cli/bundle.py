"""`edgepack bundle` commands (placeholder until implemented)."""

import typer

app = typer.Typer(help="bundle commands", no_args_is_help=True)
