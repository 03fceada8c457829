"""`edgepack keys` commands (placeholder until implemented)."""

import typer

app = typer.Typer(help="keys commands", no_args_is_help=True)
