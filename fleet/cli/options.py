"""Options every command that talks to a running fleet takes (`fleet push`, `devices …`, `rollout …`)."""

from __future__ import annotations

import typer

URL = typer.Option(None, "--fleet-url", help="Fleet URL (default $EDGEPACK_FLEET_URL or http://127.0.0.1:8080).")
TOKEN = typer.Option(None, "--token", help="API token (default $EDGEPACK_TOKEN).")
