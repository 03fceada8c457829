"""`edgepack certs` commands: a lab CA and certificates for a TLS trial (fleet HTTPS, mqtts broker, agents).

    edgepack certs lab-ca DIR                                   DIR/ca.pem + ca.key
    edgepack certs issue DIR --name fleet --san fleet.local     DIR/fleet.pem + fleet.key (server; 127.0.0.1, localhost too)
    edgepack certs issue DIR --name cam-017 --client            DIR/cam-017.pem + .key (a client certificate)

For production, use certificates from your own PKI instead (see docs/security.md, "TLS").
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Create a lab CA and TLS certificates for a trial.", no_args_is_help=True)


@app.command("lab-ca")
def lab_ca(
    directory: Path = typer.Argument(..., metavar="DIR", help="Folder to write ca.pem and ca.key (mode 0600) into."),
    common_name: str = typer.Option("edgepack lab CA", "--common-name", help="The CA certificate's subject CN."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Create a certificate authority for a trial; refuses to overwrite an existing one."""
    from edgepack.tls import create_lab_ca, describe

    issued = create_lab_ca(directory, common_name=common_name)
    info = describe(issued.cert)
    if as_json:
        typer.echo(json.dumps({**info, "cert": str(issued.cert), "key": str(issued.key)}))
        return
    typer.echo(f"CA certificate: {issued.cert}  (give to agents as ca_file, to the fleet as --mqtt-ca)")
    typer.echo(f"CA key:         {issued.key}  (keep secret; mode 0600)")
    typer.echo(f"valid until:    {info['not_after']}")


@app.command("issue")
def issue(
    directory: Path = typer.Argument(..., metavar="DIR", help="Folder of the lab CA; the certificate is written there."),
    name: str = typer.Option(..., "--name", help="File name (NAME.pem, NAME.key) and common name, e.g. fleet or broker."),
    sans: list[str] = typer.Option([], "--san", help="A host name or IP address the server is reached at (repeatable)."),
    client: bool = typer.Option(False, "--client", help="A client certificate (for brokers that require one)."),
    loopback: bool = typer.Option(True, "--loopback/--no-loopback", help="Also valid for 127.0.0.1 and localhost."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Issue a server (or client) certificate signed by the lab CA in DIR."""
    from edgepack.tls import describe, issue_certificate

    issued = issue_certificate(directory, name, sans, client=client, loopback=loopback)
    info = describe(issued.cert)
    if as_json:
        typer.echo(json.dumps({**info, "cert": str(issued.cert), "key": str(issued.key)}))
        return
    typer.echo(f"certificate: {issued.cert}  ({'client' if client else 'server'}; {', '.join(info['sans']) or 'no SANs'})")
    typer.echo(f"key:         {issued.key}  (keep secret; mode 0600)")
    typer.echo(f"valid until: {info['not_after']}")
