"""`edgepack keys` commands: create the Ed25519 key pair that signs bundles."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Create the Ed25519 key pair that signs bundles.", no_args_is_help=True)


@app.command("generate")
def generate(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="Folder to write edgepack.key (mode 0600) and edgepack.pub into."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Write a new signing key pair; refuses to overwrite an existing key."""
    from edgepack.signing import generate_keypair, key_id, load_public_key

    private_path, public_path = generate_keypair(directory)
    signer_id = key_id(load_public_key(public_path))
    if as_json:
        typer.echo(json.dumps({"private_key": str(private_path), "public_key": str(public_path), "key_id": signer_id}))
        return
    typer.echo(f"private key: {private_path}  (keep secret; mode 0600)")
    typer.echo(f"public key:  {public_path}  (give to fleets and devices as a trusted key)")
    typer.echo(f"key id:      {signer_id}")
