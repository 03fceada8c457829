"""`edgepack tokens create|list|revoke`: API tokens with a role, optional scopes and an optional expiry."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from fleet.cli.options import TOKEN, URL

app = typer.Typer(help="API tokens: a role (viewer, operator, admin), optional scopes and expiry.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)


def _print(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="What the token is for (shown in the audit log)."),
    role: str = typer.Option("viewer", "--role", help="viewer, operator or admin."),
    scopes: Optional[list[str]] = typer.Option(
        None, "--scope", help="Limit it to a route group, e.g. rollouts:write (repeat for more); default: all its role may."),
    ttl: Optional[float] = typer.Option(None, "--ttl", help="Seconds until it expires; default: never."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Create an API token and print it (shown once; the fleet keeps only its hash)."""
    from fleet.client import FleetClient

    created = FleetClient(fleet_url, token).request(
        "POST", "/tokens", json={"name": name, "role": role, "scopes": scopes or None, "ttl_s": ttl})
    if json_output:
        _print(created)
    else:
        sys.stdout.write(created["token"] + "\n")


@app.command("list")
def list_tokens(
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Every API token with its role, scopes, expiry and whether it is revoked (never the secrets)."""
    from fleet.client import FleetClient

    rows = FleetClient(fleet_url, token).request("GET", "/tokens")
    if json_output:
        _print(rows)
        return
    table = Table(title=f"{len(rows)} tokens", title_justify="left")
    for column in ("id", "name", "role", "scopes", "expires", "revoked"):
        table.add_column(column)
    for row in rows:
        scopes = ",".join(row["scopes"]) if row["scopes"] is not None else "all"
        table.add_row(str(row["id"]), row["name"], row["role"], scopes, row["expires_at"] or "never",
                      "yes" if row["revoked"] else "no")
    console.print(table)


@app.command("revoke")
def revoke(
    token_id: int = typer.Argument(..., help="The token's id (from `edgepack tokens list`)."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Revoke a token at once (not the one you call with, nor the last admin token)."""
    from fleet.client import FleetClient

    revoked = FleetClient(fleet_url, token).request("POST", f"/tokens/{token_id}/revoke")
    if json_output:
        _print(revoked)
    else:
        sys.stdout.write(f"revoked token {revoked['id']} ({revoked['name']})\n")
