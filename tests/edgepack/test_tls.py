"""The lab CA (edgepack.tls, `edgepack certs`) and the MQTT endpoint (edgepack.mqtt) against a real Mosquitto TLS
listener: the right CA connects, a wrong CA or a wrong host name is one ConfigError line, a broker that requires
client certificates takes a lab client certificate."""

from __future__ import annotations

import json
import os
import queue
import stat
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from typer.testing import CliRunner

from edgepack.cli import app
from edgepack.errors import ConfigError
from edgepack.mqtt import MqttEndpoint, connect_client, redact_url
from edgepack.tls import create_lab_ca, describe, issue_certificate
from testbeds.mosquitto import BrokerTls, MosquittoBroker


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab CA with a broker certificate and a client certificate, and a second, unrelated CA."""
    root = tmp_path_factory.mktemp("lab")
    create_lab_ca(root / "ca")
    issue_certificate(root / "ca", "broker")
    issue_certificate(root / "ca", "cam-1", client=True)
    issue_certificate(root / "ca", "elsewhere", ["elsewhere.lab"], loopback=False)
    create_lab_ca(root / "other")
    return root


def _connect(endpoint: MqttEndpoint) -> str:
    """Connect a paho client through connect_client and return the CONNACK reason ('Success' when accepted)."""
    results: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-test")
    client.on_connect = lambda c, u, f, reason_code, p: results.put(str(reason_code))
    connect_client(client, endpoint, keepalive_s=10)
    client.loop_start()
    try:
        return results.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_lab_ca_issues_server_certificates_valid_for_loopback_and_given_names(tmp_path):
    create_lab_ca(tmp_path)
    issued = issue_certificate(tmp_path, "fleet", ["fleet.local", "10.1.2.3"])
    info = describe(issued.cert)
    assert info["sans"] == ["127.0.0.1", "localhost", "fleet.local", "10.1.2.3"]
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_lab_ca_refuses_to_overwrite_and_to_issue_without_a_ca(tmp_path):
    create_lab_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match="already exists"):
        create_lab_ca(tmp_path / "ca")
    issue_certificate(tmp_path / "ca", "fleet")
    with pytest.raises(ConfigError, match="already exists"):
        issue_certificate(tmp_path / "ca", "fleet")
    with pytest.raises(ConfigError, match="no lab CA in"):
        issue_certificate(tmp_path / "nothing", "fleet")
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        issue_certificate(tmp_path / "ca", "bad", ["two words"])


def test_certs_cli_creates_a_ca_and_certificates(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["certs", "lab-ca", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ca.pem" in result.output
    result = runner.invoke(app, ["certs", "issue", str(tmp_path), "--name", "broker", "--san", "broker.lab", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["sans"] == ["127.0.0.1", "localhost", "broker.lab"]
    assert document["subject"] == "CN=broker"
    # The real console script: the refusal is one line and exit code 2.
    again = subprocess.run([sys.executable, "-m", "edgepack", "certs", "issue", str(tmp_path), "--name", "broker"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: {tmp_path / 'broker.pem'} already exists; refusing to overwrite it"]


def test_endpoint_parses_urls_and_never_shows_the_password():
    endpoint = MqttEndpoint.from_url("mqtts://cam%2D1:s3cr%40t@broker.lab", ca_file=None, client_id="agent")
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.lab", 8883, True)
    assert (endpoint.username, endpoint.password) == ("cam-1", "s3cr@t")
    assert "s3cr" not in repr(endpoint) and "s3cr" not in endpoint.redacted()
    assert endpoint.redacted() == "mqtts://cam-1:***@broker.lab:8883"
    plain = MqttEndpoint.from_url("mqtt://127.0.0.1", username="fleet", password="pw")
    assert (plain.port, plain.tls, plain.username) == (1883, False, "fleet")
    assert redact_url("mqtt://u:pw@h:1") == "mqtt://u:***@h:1"
    with pytest.raises(ConfigError, match="expected mqtt://host:port"):
        MqttEndpoint.from_url("http://h:1")
    with pytest.raises(ConfigError, match="does not exist"):
        MqttEndpoint.from_url("mqtts://h", ca_file="/nonexistent/ca.pem").ssl_context()


def test_mqtts_with_the_lab_ca_connects_and_a_wrong_ca_is_one_line(lab):
    tls = BrokerTls(lab / "ca" / "ca.pem", lab / "ca" / "broker.pem", lab / "ca" / "broker.key")
    with MosquittoBroker(tls=tls) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        assert _connect(MqttEndpoint.from_url(broker.url, ca_file=lab / "ca" / "ca.pem")) == "Success"
        with pytest.raises(ConfigError) as refused:
            _connect(MqttEndpoint.from_url(broker.url, ca_file=lab / "other" / "ca.pem"))
        # Mosquitto sends the chain up to the lab CA, which the other CA does not know.
        assert str(refused.value) == (f"broker certificate not trusted by CA {lab / 'other' / 'ca.pem'}: "
                                      f"self-signed certificate in certificate chain ({broker.url})")

    # A certificate the lab CA signed, but for another host name: refused too (host names are verified).
    tls = BrokerTls(lab / "ca" / "ca.pem", lab / "ca" / "elsewhere.pem", lab / "ca" / "elsewhere.key")
    with MosquittoBroker(tls=tls) as broker:
        with pytest.raises(ConfigError, match="^broker certificate not trusted by CA .*IP address mismatch"):
            MqttEndpoint.from_url(broker.url, ca_file=lab / "ca" / "ca.pem").probe_tls()


def test_a_broker_that_requires_client_certificates_takes_a_lab_client_certificate(lab):
    tls = BrokerTls(lab / "ca" / "ca.pem", lab / "ca" / "broker.pem", lab / "ca" / "broker.key", require_certificate=True)
    with MosquittoBroker(tls=tls) as broker:
        with_cert = MqttEndpoint.from_url(broker.url, ca_file=lab / "ca" / "ca.pem", certfile=lab / "ca" / "cam-1.pem",
                                          keyfile=lab / "ca" / "cam-1.key")
        assert _connect(with_cert) == "Success"
        with pytest.raises(ConfigError, match="TLS with MQTT broker .* failed"):
            MqttEndpoint.from_url(broker.url, ca_file=lab / "ca" / "ca.pem").probe_tls()


def test_plain_mqtt_still_connects(mosquitto):
    assert _connect(MqttEndpoint.from_url(mosquitto.url)) == "Success"


def test_fleet_serve_refuses_unusable_https_files_in_one_line(lab, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgepack", "fleet", "serve", "--port", "0", "--data-dir",
                               str(tmp_path / "data"), "--mqtt-url", "mqtt://127.0.0.1:9", *args],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "EDGEPACK_ADMIN_TOKEN": "tls-test-admin-token-0123456789"})

    alone = serve("--tls-cert", str(lab / "ca" / "broker.pem"))
    assert alone.returncode == 2
    assert "tls_cert and tls_key go together" in alone.stderr.strip().splitlines()[-1]
    mismatched = serve("--tls-cert", str(lab / "ca" / "broker.pem"), "--tls-key", str(lab / "ca" / "cam-1.key"))
    assert mismatched.returncode == 2
    assert mismatched.stderr.strip().splitlines()[-1] == (
        f"error: TLS certificate {lab / 'ca' / 'broker.pem'} and key {lab / 'ca' / 'cam-1.key'} cannot be used: "
        "KEY_VALUES_MISMATCH")
    assert not (tmp_path / "data").exists()  # refused before anything started


@pytest.fixture
def https_server(lab):
    """A real HTTPS server on loopback (the lab broker certificate, valid for 127.0.0.1) serving one payload."""
    import hashlib
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    payload = bytes(range(256)) * 64

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(lab / "ca" / "broker.pem"), str(lab / "ca" / "broker.key"))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", payload, hashlib.sha256(payload).hexdigest()
    httpd.shutdown()
    httpd.server_close()


def test_agent_downloads_over_https_verified_against_its_ca_and_refuses_another(lab, https_server, tmp_path):
    import ssl

    from device_agent.downloader import Downloader, DownloadRefused, DownloadSettings
    from device_agent.fleet_api import FleetClient
    from edgepack.protocol import BundleRef

    url, payload, digest = https_server
    ref = BundleRef(id=digest, name="m", version="1.0.0", profile="x86-avx2", sha256=digest, size=len(payload),
                    url="/api/v1/bundles/x/download")
    settings = DownloadSettings(retries=2, backoff_s=0.01, timeout_s=5)

    def client(ca: str) -> FleetClient:
        return FleetClient(url, "dev-1", credential="dc_x", ssl_context=ssl.create_default_context(cafile=str(lab / ca / "ca.pem")),
                           ca_label=f"CA {lab / ca / 'ca.pem'}")

    fetched = Downloader(tmp_path / "good", client("ca"), settings).fetch(ref)
    assert fetched.path.read_bytes() == payload
    with pytest.raises(DownloadRefused) as refused:  # not retried: waiting will not make it trusted
        Downloader(tmp_path / "bad", client("other"), settings).fetch(ref)
    assert str(refused.value) == (f"download of bundle {digest[:12]} refused: fleet certificate not trusted by CA "
                                  f"{lab / 'other' / 'ca.pem'}: unable to get local issuer certificate ({url})")
