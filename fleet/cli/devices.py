"""`edgepack devices list|enroll-token|revoke|rotate-credential`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgepack.selectors import parse_selector
from fleet.cli.options import TOKEN, URL

app = typer.Typer(help="Enrolled devices and enrollment tokens.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)


@app.command("list")
def list_devices(
    selector: Optional[str] = typer.Option(None, "--selector", "-l", help="Label selector k=v,k2=v2."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Only devices of this hardware profile."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Devices with their profile, labels, active bundle and last status."""
    from fleet.client import FleetClient

    params = {k: v for k, v in (("selector", selector), ("profile", profile)) if v}
    devices = FleetClient(fleet_url, token).request("GET", "/devices", params=params)
    if json_output:
        sys.stdout.write(json.dumps(devices, indent=2) + "\n")
        return
    table = Table(title=f"{len(devices)} devices", title_justify="left")
    for column in ("device", "profile", "labels", "online", "phase", "bundle", "last seen"):
        table.add_column(column)
    for d in devices:
        labels = ",".join(f"{k}={v}" for k, v in sorted((d.get("labels") or {}).items()))
        table.add_row(d["id"], d.get("profile", ""), labels, "yes" if d.get("online") else "no", d.get("phase") or "",
                      (d.get("current_bundle_id") or "")[:12], str(d.get("last_seen") or ""))
    console.print(table)


@app.command("enroll-token")
def enroll_token(
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels the enrolled devices get, k=v,k2=v2."),
    uses: int = typer.Option(1, "--uses", min=1, help="How many devices may enroll with it."),
    ttl: float = typer.Option(86400, "--ttl", help="Seconds until it expires."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Only devices of this hardware profile may enroll with it."),
    bind_labels: bool = typer.Option(False, "--bind-labels", help="Devices may add labels but not change the token's."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Create an enrollment token; an agent presents it once and gets its own device credential."""
    from fleet.client import FleetClient

    created = FleetClient(fleet_url, token).request(
        "POST", "/devices/enrollment-tokens", json={"labels": parse_selector(labels), "uses": uses, "ttl_s": ttl, "profile": profile,
                                                   "bind_labels": bind_labels})
    if json_output:
        sys.stdout.write(json.dumps(created, indent=2) + "\n")
    else:
        sys.stdout.write(created["token"] + "\n")


@app.command("revoke")
def revoke(
    device_id: str = typer.Argument(..., help="The device to revoke."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Revoke a device: its credential stops working (HTTP and MQTT) and its MQTT session is closed."""
    from fleet.client import FleetClient

    device = FleetClient(fleet_url, token).request("POST", f"/devices/{device_id}/revoke")
    if json_output:
        sys.stdout.write(json.dumps(device, indent=2) + "\n")
    else:
        console.print(f"revoked {device['id']} at {device.get('revoked_at')}")


@app.command("rotate-credential")
def rotate_credential(
    device_id: str = typer.Argument(..., help="The device whose secret to replace."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Print a new secret for the device (put it in its state_dir/credential); the old one stops working."""
    from fleet.client import FleetClient

    rotated = FleetClient(fleet_url, token).request("POST", f"/devices/{device_id}/rotate-credential")
    if json_output:
        sys.stdout.write(json.dumps(rotated, indent=2) + "\n")
    else:
        sys.stdout.write(rotated["credential"] + "\n")
