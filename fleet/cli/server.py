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

from edgepack.errors import ConfigError, first_validation_error
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
    # Each parameter is named as the FleetSettings field it sets (tests/fleet/test_settings.py checks that every
    # field has one); None leaves the field to its environment variable, then to its default.
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default 8080; 0: any free port)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="SQLite database, bundle store, admin.token (default ./fleet-data)."),
    db_url: Optional[str] = typer.Option(None, "--db-url", help="Database URL (postgresql://…); default SQLite in the data dir."),
    mqtt_url: Optional[str] = typer.Option(None, "--mqtt-url", help="Broker URL (mqtt://host:1883); default an embedded broker."),
    embedded_mqtt_port: Optional[int] = typer.Option(None, "--embedded-mqtt-port", help="Port of the embedded broker when no --mqtt-url (default 1883)."),
    mqtt_client_id: Optional[str] = typer.Option(None, "--mqtt-client-id", help="The server's MQTT client id; default one generated once and kept in the data dir."),
    mqtt_persistent_session: Optional[bool] = typer.Option(
        None, "--mqtt-persistent-session/--mqtt-clean-session",
        help="Keep the broker session across restarts, so telemetry sent while the server is down is stored when it is back (default on)."),
    mqtt_share_group: Optional[str] = typer.Option(None, "--mqtt-share-group", help="Replicas of one fleet set the same group: each consumes its share of device messages ($share/GROUP/…)."),
    mqtt_ca: Optional[Path] = typer.Option(None, "--mqtt-ca", help="CA file the mqtts:// broker's certificate must chain to (default the system store)."),
    mqtt_cert: Optional[Path] = typer.Option(None, "--mqtt-cert", help="Client certificate (PEM) for a broker that requires one."),
    mqtt_key: Optional[Path] = typer.Option(None, "--mqtt-key", help="Key (PEM) of --mqtt-cert."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Certificate (PEM, chain first) to serve the API over HTTPS."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Key (PEM) of --tls-cert."),
    mqtt_dynsec: Optional[bool] = typer.Option(
        None, "--mqtt-dynsec/--no-mqtt-dynsec",
        help="The broker runs the dynamic security plugin (see `fleet broker-config`): manage device identities in it."),
    device_message_rate: Optional[float] = typer.Option(None, "--device-message-rate", help="MQTT messages a second one device may send; the rest are ignored (default 20)."),
    device_message_burst: Optional[float] = typer.Option(None, "--device-message-burst", help="Messages one device may send at once above its rate (default 200)."),
    ingest_queue: Optional[int] = typer.Option(None, "--ingest-queue", help="Decoded device messages waiting for a writer before the MQTT thread waits (default 20000)."),
    ingest_batch: Optional[int] = typer.Option(None, "--ingest-batch", help="Messages one writer stores per transaction at most (default 500)."),
    ingest_writers: Optional[int] = typer.Option(None, "--ingest-writers", help="Writer threads storing status and telemetry (default 1 on SQLite, 2 on PostgreSQL)."),
    telemetry_retention_days: Optional[float] = typer.Option(None, "--telemetry-retention-days", help="Days raw telemetry windows are kept before they are rolled up hourly and deleted (default 30)."),
    rollup_retention_days: Optional[float] = typer.Option(None, "--rollup-retention-days", help="Days the hourly telemetry aggregates are kept (default 400)."),
    maintenance_interval_s: Optional[float] = typer.Option(None, "--maintenance-interval-s", help="Seconds between two retention passes (default 3600)."),
    public_url: Optional[str] = typer.Option(None, "--public-url", help="URL devices use to download bundles."),
    bundle_store: Optional[str] = typer.Option(None, "--bundle-store", help="s3://BUCKET or s3://BUCKET/PREFIX: keep bundles in an S3-compatible bucket; devices download from presigned URLs (default the data dir's bundles folder)."),
    s3_endpoint_url: Optional[str] = typer.Option(None, "--s3-endpoint-url", help="The S3-compatible server (MinIO, Ceph RGW, R2, …); default AWS. Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or boto3's other sources."),
    s3_region: Optional[str] = typer.Option(None, "--s3-region", help="The bucket's region (default us-east-1)."),
    presign_expires_s: Optional[int] = typer.Option(None, "--presign-expires-s", help="Lifetime of a presigned bundle URL in seconds (default 900)."),
    trusted_keys: Optional[list[Path]] = typer.Option(None, "--trusted-key", help="Public key allowed to sign bundles (repeatable)."),
    max_bundle_bytes: Optional[int] = typer.Option(None, "--max-bundle-bytes", help="Largest bundle upload accepted (default 4 GiB)."),
    controller_interval_s: Optional[float] = typer.Option(None, "--controller-interval-s", help="Seconds between two passes of the rollout controller (default 1)."),
    alert_webhook_url: Optional[str] = typer.Option(None, "--alert-webhook", help="URL alerts (drift outside a rollout) are POSTed to as JSON."),
    drift_alert_threshold: Optional[float] = typer.Option(None, "--drift-threshold", help="Drift score above which a device outside a rollout raises an alert (default 0.25)."),
    alert_repeat_s: Optional[float] = typer.Option(None, "--alert-repeat-s", help="Seconds before an open alert for the same device, bundle and kind is raised again (default 3600)."),
) -> None:
    """Run the fleet server: API, rollout controller and MQTT bridge (with an embedded broker if no --mqtt-url).

    Every option also reads an environment variable (EDGEPACK_FLEET_HOST, EDGEPACK_MQTT_URL, …: see
    fleet/settings.py); the admin token only from EDGEPACK_ADMIN_TOKEN (a command line is readable by
    every user of the machine), else one is generated on first start."""
    import uvicorn
    from pydantic import ValidationError

    from fleet.app import create_app, prepare
    from fleet.db import make_engine
    from fleet.embedded_broker import EmbeddedBroker
    from fleet.mqtt_bridge import check_broker, lifespan_hook, redact_mqtt_url
    from fleet.settings import FleetSettings
    from fleet.store import store_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = _trusted_keys(trusted_keys)
    options = {"host": host, "port": port, "data_dir": data_dir, "db_url": db_url or None, "mqtt_url": mqtt_url or None,
               "embedded_mqtt_port": embedded_mqtt_port, "mqtt_client_id": mqtt_client_id,
               "mqtt_persistent_session": mqtt_persistent_session, "mqtt_dynsec": mqtt_dynsec,
               "mqtt_share_group": mqtt_share_group,
               "device_message_rate": device_message_rate, "device_message_burst": device_message_burst,
               "ingest_queue": ingest_queue, "ingest_batch": ingest_batch, "ingest_writers": ingest_writers,
               "telemetry_retention_days": telemetry_retention_days, "rollup_retention_days": rollup_retention_days,
               "maintenance_interval_s": maintenance_interval_s, "public_url": public_url or None,
               "bundle_store": bundle_store or None, "s3_endpoint_url": s3_endpoint_url or None,
               "s3_region": s3_region or None, "presign_expires_s": presign_expires_s,
               "trusted_keys": [key.resolve() for key in keys] or None, "max_bundle_bytes": max_bundle_bytes,
               "controller_interval_s": controller_interval_s, "alert_webhook_url": alert_webhook_url or None,
               "drift_alert_threshold": drift_alert_threshold,
               "alert_repeat_s": alert_repeat_s, "mqtt_ca": mqtt_ca, "mqtt_cert": mqtt_cert, "mqtt_key": mqtt_key,
               "tls_cert": tls_cert, "tls_key": tls_key}
    # Everything is checked before anything starts: the settings, the HTTP port, the broker, the database.
    try:
        settings = FleetSettings.from_env(**options)
    except ValidationError as exc:  # an option or environment value out of range
        raise ConfigError(first_validation_error(exc, "fleet settings")) from None
    embedded = settings.mqtt_url is None
    if embedded and settings.mqtt_share_group:
        raise ConfigError("--mqtt-share-group needs an external broker (--mqtt-url): the embedded one serves a single "
                          "server and has no shared subscriptions")
    if settings.https:
        _check_tls_pair(settings.tls_cert, settings.tls_key)
    scheme = "https" if settings.https else "http"
    with ExitStack() as started:
        listener = _listen(settings.host, settings.port)
        started.callback(listener.close)
        derived: dict[str, object] = {"port": listener.getsockname()[1]}  # the port --port 0 picked
        if not settings.public_url and settings.host not in ("0.0.0.0", "::", ""):
            # on a wildcard address download URLs stay relative to the fleet URL
            derived["public_url"] = f"{scheme}://{settings.host}:{derived['port']}"
        if not settings.trusted_keys:
            console.print("[yellow]no trusted bundle keys: every upload will be refused[/yellow] (pass --trusted-key KEY.pub)")
        if embedded:
            broker_host = "127.0.0.1" if settings.host in ("127.0.0.1", "localhost") else "0.0.0.0"
            # secure like production: the fleet's identity with a password kept in the data dir, devices by credential
            broker = EmbeddedBroker(host=broker_host, port=settings.embedded_mqtt_port,
                                    fleet_password=_embedded_fleet_password(settings.data_dir)).start()
            started.callback(broker.stop)
            _keep_embedded_fleet_password(settings.data_dir, broker.fleet_password)
            derived["mqtt_url"] = broker.fleet_url.replace(f"@{broker.host}:", "@127.0.0.1:")
            console.print(f"embedded MQTT broker on {broker.host}:{settings.embedded_mqtt_port} (use --mqtt-url for Mosquitto)")
        else:
            check_broker(settings.mqtt_endpoint())  # reachable, and with mqtts:// trusted by --mqtt-ca
        settings = settings.model_copy(update=derived)
        engine = make_engine(settings.database_url)
        started.callback(engine.dispose)
        store = store_for(settings)
        check_store = getattr(store, "check", None)
        if check_store is not None:
            check_store()  # the bucket answers to our credentials, before anything is written
        new_token = prepare(settings, engine)
        if new_token:
            console.print(f"[bold]admin token[/bold] (shown once, also in {settings.admin_token_file}): {new_token}")
        console.print(f"fleet on {scheme}://{settings.host}:{settings.port}  database {engine.url.render_as_string(hide_password=True)}  "
                      f"mqtt {redact_mqtt_url(settings.mqtt_url or '')}  bundles {settings.bundle_store or settings.store_dir}  "
                      f"trusted keys: {', '.join(str(k) for k in settings.trusted_keys) or 'none'}")
        api = create_app(settings, engine=engine, store=store, lifespan_hooks=[lifespan_hook])
        api.state.device_identities = _device_identities(settings, broker if embedded else None, api)
        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)} if settings.https else {}
        uvicorn.Server(uvicorn.Config(api, host=settings.host, port=settings.port, log_level="warning", **tls)).run(sockets=[listener])


EMBEDDED_FLEET_PASSWORD_FILE = "mqtt-fleet-password"


def _embedded_fleet_password(data_dir: Path) -> str | None:
    """The fleet's password on its embedded broker, kept (0600) in the data dir; None: a new one."""
    path = data_dir / EMBEDDED_FLEET_PASSWORD_FILE
    stored = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    return stored or None


def _keep_embedded_fleet_password(data_dir: Path, password: str) -> None:
    """Written once the broker is up, so a server that could not start leaves no data dir behind."""
    from edgepack.files import atomic_write

    path = data_dir / EMBEDDED_FLEET_PASSWORD_FILE
    if _embedded_fleet_password(data_dir) != password:
        data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, password + "\n", mode=0o600)


def _device_identities(settings, embedded, api):  # -> fleet.broker.DeviceIdentities
    """Who the fleet tells about device identities: the embedded broker (it reads the database and closes
    sessions), Mosquitto's dynsec plugin, or nobody (a broker the fleet does not manage)."""
    from fleet.broker import NoBrokerIdentities

    if embedded is not None:
        embedded.use_fleet_database(api.state.session_factory)
        return embedded
    if settings.mqtt_dynsec:
        from fleet.broker.dynsec import DynsecIdentities

        return DynsecIdentities(settings.mqtt_endpoint())
    return NoBrokerIdentities()


@app.command("prune")
def prune(
    data_dir: Path = typer.Option(Path("fleet-data"), "--data-dir", help="The fleet's data folder (its SQLite database)."),
    db_url: Optional[str] = typer.Option(None, "--db-url", help="Database URL (postgresql://…); default SQLite in the data dir."),
    telemetry_retention_days: float = typer.Option(30.0, "--telemetry-retention-days", min=0.0, help="Keep raw telemetry windows this many days; roll older ones up hourly and delete them."),
    rollup_retention_days: float = typer.Option(400.0, "--rollup-retention-days", min=0.0, help="Keep hourly aggregates this many days."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Apply the telemetry retention now (a running server does it every --maintenance-interval-s)."""
    from fleet.db import make_engine, make_session_factory, migrate, sqlite_url
    from fleet.services.retention import prune_telemetry

    engine = make_engine(db_url or sqlite_url(data_dir))
    try:
        migrate(engine)
        with make_session_factory(engine)() as session:
            result = prune_telemetry(session, raw_days=telemetry_retention_days, rollup_days=rollup_retention_days)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    console.print(f"{result.windows_deleted} telemetry windows older than {result.raw_cutoff:%Y-%m-%d %H:%M} UTC rolled up "
                  f"and deleted ({result.rollups_written} new hourly rollups); {result.rollups_deleted} rollups older than "
                  f"{result.rollup_cutoff:%Y-%m-%d} deleted")
    if result.partitions_dropped:
        console.print(f"PostgreSQL day partitions dropped: {', '.join(result.partitions_dropped)}")


@app.command("broker-config")
def broker_config(
    out: Path = typer.Option(..., "--out", help="Folder to write mosquitto.conf, dynamic-security.json and fleet-mqtt-password into."),
    port: int = typer.Option(1883, "--port", min=1, max=65535, help="The broker's listener port."),
    plugin: Optional[str] = typer.Option(None, "--plugin", help="Path of mosquitto_dynamic_security.so (default: found on this machine)."),
    dynsec_path: Optional[str] = typer.Option(None, "--dynsec-path", help="Where the broker will read dynamic-security.json (e.g. inside a container)."),
) -> None:
    """Write the production Mosquitto config: no anonymous clients, the dynamic security plugin holding the
    fleet's identity; then run the fleet with --mqtt-dynsec and the URL it prints."""
    from fleet.broker.config import write_broker_config

    files = write_broker_config(out, plugin_path=plugin, port=port, dynsec_path=dynsec_path)
    console.print(f"wrote {files.config}, {files.dynsec} and {files.password_file}")
    console.print(f"run the fleet with: --mqtt-dynsec --mqtt-url mqtt://{files.fleet_username}:PASSWORD@BROKER:{port} "
                  f"(PASSWORD is in {files.password_file})")


@app.command("rotate-key")
def rotate_key(
    data_dir: Path = typer.Option(Path("fleet-data"), "--data-dir", help="The fleet's data folder (its director/ holds the key)."),
    finish: bool = typer.Option(False, "--finish", help="Make the announced next key the current one (after every "
                                                         "device pins it)."),
) -> None:
    """Rotate the key that signs desired states: first announce the next key, later make it current. Each step
    takes effect when the server (re)starts; see the README, "Rotating the fleet key"."""
    from fleet.director import begin_rotation, finish_rotation

    if not (data_dir / "director").is_dir():
        raise ConfigError(f"{data_dir} holds no fleet key (director/): start the fleet with this --data-dir first")
    if finish:
        console.print(f"fleet key {finish_rotation(data_dir)} is now current (the old one is kept as "
                      f"{data_dir}/director-retired-…); restart the server")
        return
    announced = begin_rotation(data_dir)
    console.print(f"next fleet key {announced.key_id} made; restart the server so every desired state announces it, "
                  f"then run this with --finish once every device's last_status.fleet_keys names it")


def _check_tls_pair(cert: Path, key: Path) -> None:
    """Load the HTTPS certificate and key once before anything starts: a missing file or a key that does
    not match is one line here, not a uvicorn traceback after the broker and the database started."""
    import ssl

    for path in (cert, key):
        if not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist (check --tls-cert/--tls-key)", path=str(path))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS certificate {cert} and key {key} cannot be used: {exc.reason or exc}",
                          path=str(cert)) from None


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
