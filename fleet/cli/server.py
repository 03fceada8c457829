"""`edgepack fleet serve|push`: run the fleet server, upload a bundle."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from edgepack.errors import ConfigError
from fleet.cli.options import TOKEN, URL

app = typer.Typer(help="Run the fleet server; upload bundles to it.", no_args_is_help=True)
console = Console(stderr=True, highlight=False, soft_wrap=True)



def _default_trusted_keys() -> list[Path]:
    """Keys a laptop demo signs with: ./keys/edgepack.pub and the development key `edgepack build` creates."""
    from edgepack.signing import dev_key_path

    candidates = [Path("keys/edgepack.pub"), dev_key_path().with_suffix(".pub")]
    return [path for path in candidates if path.is_file()]


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="HTTP port."),
    data_dir: Path = typer.Option(Path("fleet-data"), "--data-dir", help="SQLite database, bundle store, admin.token."),
    db_url: Optional[str] = typer.Option(None, "--db-url", help="Database URL (postgresql://…); default SQLite in the data dir."),
    mqtt_url: Optional[str] = typer.Option(None, "--mqtt-url", help="Broker URL (mqtt://host:1883); default an embedded broker."),
    mqtt_port: int = typer.Option(1883, "--embedded-mqtt-port", help="Port of the embedded broker when no --mqtt-url."),
    public_url: Optional[str] = typer.Option(None, "--public-url", help="URL devices use to download bundles."),
    trusted_key: Optional[list[Path]] = typer.Option(None, "--trusted-key", help="Public key allowed to sign bundles (repeatable)."),
    alert_webhook: Optional[str] = typer.Option(None, "--alert-webhook", help="URL alerts (drift outside a rollout) are POSTed to as JSON."),
    gate_settle: Optional[float] = typer.Option(None, "--gate-settle-s", help="Seconds after a wave starts whose telemetry the gates do not judge (installs, cold models)."),
    drift_threshold: Optional[float] = typer.Option(None, "--drift-threshold", help="Drift score above which a device outside a rollout raises an alert (default 0.25)."),
) -> None:
    """Run the fleet server: API, rollout controller and MQTT bridge (with an embedded broker if no --mqtt-url)."""
    import uvicorn

    from fleet.app import create_app, prepare
    from fleet.db import make_engine
    from fleet.embedded_broker import EmbeddedBroker
    from fleet.mqtt_bridge import lifespan_hook
    from fleet.settings import FleetSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = _trusted_keys(trusted_key)
    embedded = not mqtt_url and not os.environ.get("EDGEPACK_MQTT_URL")
    if embedded:
        mqtt_url = f"mqtt://127.0.0.1:{mqtt_port}"
    # Everything is checked before anything starts: the settings, then the HTTP port, then the broker.
    listener = _listen(host, port)
    port = listener.getsockname()[1]  # the port --port 0 picked
    overrides = {"host": host, "port": port, "data_dir": data_dir}
    if not public_url and not os.environ.get("EDGEPACK_PUBLIC_URL") and host not in ("0.0.0.0", "::", ""):
        public_url = f"http://{host}:{port}"  # on a wildcard address download URLs stay relative to the fleet URL
    for name, value in (("db_url", db_url), ("mqtt_url", mqtt_url), ("public_url", public_url),
                        ("alert_webhook_url", alert_webhook), ("drift_alert_threshold", drift_threshold),
                        ("gate_settle_s", gate_settle)):
        if value not in (None, ""):
            overrides[name] = value
    if keys:
        overrides["trusted_keys"] = [key.resolve() for key in keys]
    with ExitStack() as started:
        started.callback(listener.close)
        try:
            settings = FleetSettings.from_env(**overrides)
        except ValueError as exc:  # pydantic's ValidationError: an option or environment value out of range
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
            raise ConfigError(f"fleet settings: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if not settings.trusted_keys:
            console.print("[yellow]no trusted bundle keys: every upload will be refused[/yellow] (pass --trusted-key KEY.pub)")
        if embedded:
            broker = EmbeddedBroker(host="127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0", port=mqtt_port).start()
            started.callback(broker.stop)
            console.print(f"embedded MQTT broker on {broker.host}:{mqtt_port} (use --mqtt-url for Mosquitto)")
        engine = make_engine(settings.database_url)
        started.callback(engine.dispose)
        new_token = prepare(settings, engine)
        if new_token:
            console.print(f"[bold]admin token[/bold] (shown once, also in {settings.admin_token_file}): {new_token}")
        console.print(f"fleet on http://{host}:{port}  database {settings.database_url.split('@')[-1]}  mqtt {settings.mqtt_url}  "
                      f"trusted keys: {', '.join(str(k) for k in settings.trusted_keys) or 'none'}")
        api = create_app(settings, engine=engine, lifespan_hooks=[lifespan_hook])
        uvicorn.Server(uvicorn.Config(api, host=host, port=port, log_level="warning")).run(sockets=[listener])


def _trusted_keys(given: Optional[list[Path]]) -> list[Path]:
    keys = list(given or [])
    if not keys and not os.environ.get("EDGEPACK_TRUSTED_KEYS"):
        keys = _default_trusted_keys()
    for key in keys:
        if not key.is_file():
            raise ConfigError(f"trusted key {key} does not exist")
    return keys


def _listen(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound here rather than by uvicorn: a taken port is one line, and it is found before
    the broker or the database is touched (uvicorn would log it and exit 1 after both started)."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}", host=host, port=port) from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        taken = exc.errno == errno.EADDRINUSE
        raise ConfigError(f"HTTP port {port} on {host} is {'already in use' if taken else 'not available: ' + str(exc.strerror)}"
                          " (choose another with --port)", host=host, port=port) from None
    return listener


@app.command("push")
def push(
    bundle: Path = typer.Argument(..., help="The .edgepack file to upload."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Also promote to staging or production."),
    json_output: bool = typer.Option(False, "--json", help="Print the stored bundle as JSON."),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Upload a bundle; the fleet verifies its signature, hashes and members before storing it."""
    from fleet.client import FleetClient

    client = FleetClient(fleet_url, token)
    stored = client.upload(bundle)
    if stage:
        stored = client.request("POST", f"/bundles/{stored['id']}/promote", json={"stage": stage})
    if json_output:
        sys.stdout.write(json.dumps(stored, indent=2) + "\n")
    else:
        console.print(f"stored {stored['name']} {stored['version']} for {stored['profile']}: {stored['id']}"
                      + (f" (stage {stored.get('stage')})" if stored.get("stage") else ""))
