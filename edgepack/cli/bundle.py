"""`edgepack bundle` commands: verify a bundle against trusted keys, or inspect one without a key."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Verify and inspect .edgepack bundles.", no_args_is_help=True)

# Manifest fields shown first by `inspect`, in this order; any others follow, sorted.
_HEADLINE_FIELDS = ("name", "version", "profile", "runtime", "precision", "format")


@app.command("verify")
def verify(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="The .edgepack file."),
    trusted_keys: list[Path] = typer.Option(
        ..., "--trusted-key", help="A trusted public key (edgepack.pub); repeat for several."
    ),
) -> None:
    """Check signature, paths and every member's hash; exit 0 when good, 1 when not."""
    from edgepack.bundle import open_bundle
    from edgepack.signing import load_public_key

    keys = [load_public_key(path) for path in trusted_keys]
    bundle = open_bundle(bundle_path, keys)
    manifest = bundle.manifest
    typer.echo(f"OK: {manifest.name} {manifest.version} {manifest.profile}, signed by {bundle.key_id}")


@app.command("inspect")
def inspect(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="The .edgepack file."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest plus bundle_sha256 and size_bytes as JSON."),
) -> None:
    """Show a bundle's manifest and files without checking its signature."""
    from edgepack.bundle import inspect_bundle

    described = inspect_bundle(bundle_path)
    if as_json:
        document = dict(described["manifest"])
        document["bundle_sha256"] = described["bundle_sha256"]
        document["size_bytes"] = described["size_bytes"]
        if described["manifest_problem"]:
            document["manifest_problem"] = described["manifest_problem"]
        typer.echo(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False))
        return
    _print_tables(bundle_path, described)


def _print_tables(bundle_path: Path, described: dict) -> None:
    # The manifest as written, not a BundleManifest: inspect also shows one that does not validate.
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False)
    manifest = described["manifest"]
    signature = described["signature"] or {}

    summary = Table(title=str(bundle_path), show_header=False, title_justify="left")
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    rest = sorted(key for key in manifest if key not in _HEADLINE_FIELDS and key != "files")
    for key in [k for k in _HEADLINE_FIELDS if k in manifest] + rest:
        value = manifest[key]
        summary.add_row(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    if described["manifest_problem"]:
        summary.add_row("problem", f"[bold red]{described['manifest_problem']}[/bold red]")
    summary.add_row("signed by", f"{signature.get('key_id', '?')} ({signature.get('alg', '?')}, not verified)")
    summary.add_row("bundle sha256", described["bundle_sha256"])
    summary.add_row("size", f"{described['size_bytes']} bytes")
    console.print(summary)

    files = Table(title="files", title_justify="left")
    files.add_column("path", overflow="fold")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    files.add_column("status")
    for row in described["files"]:
        status = row["status"] if row["status"] == "ok" else f"[bold red]{row['status']}[/bold red]"
        files.add_row(row["path"], str(row["size"]), row["sha256"][:16], status)
    console.print(files)
