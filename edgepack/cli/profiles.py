"""`edgepack profiles` commands (placeholder until implemented)."""

import typer

app = typer.Typer(help="profiles commands", no_args_is_help=True)
