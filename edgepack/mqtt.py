"""Where and how to reach an MQTT broker: one `MqttEndpoint` shared by the agent, the fleet's bridge and the testbeds.

    endpoint = MqttEndpoint.from_url("mqtts://fleet.local:8883", ca_file="ca.pem", username=device_id, password=secret)
    connect_client(client, endpoint, keepalive_s=30)   # credentials + TLS, a TLS probe, then connect_async
    client.loop_start()

`mqtt://` is plain TCP (port 1883 by default), `mqtts://` TLS (8883). With TLS the broker's certificate is verified
against `ca_file` (the system store without one) and its host name against the certificate's SANs; `certfile`/`keyfile`
present a client certificate to a broker that asks for one. paho retries a failed connection forever, and a certificate
the CA does not trust will never start working, so `connect_client` first makes one TLS handshake itself: a certificate
problem is one `ConfigError` line ("broker certificate not trusted by CA FILE: ...") instead of an endless silent retry,
while a broker that is merely down is left to paho's reconnect loop. The password never appears in a repr or a log:
`redacted()` is the URL to print.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from edgepack.errors import ConfigError

PLAIN_SCHEMES = ("mqtt", "tcp")
TLS_SCHEMES = ("mqtts", "ssl")


class MqttEndpoint(BaseModel):
    """A broker address with the identity and trust to use there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    ca_file: Path | None = Field(default=None, description="PEM CA bundle the broker's certificate must chain to.")
    certfile: Path | None = Field(default=None, description="PEM client certificate, for brokers that require one.")
    keyfile: Path | None = Field(default=None, description="PEM key of certfile (omit when certfile holds both).")
    client_id: str = ""

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> "MqttEndpoint":
        """Parse `mqtt[s]://[user:pass@]host[:port]`; keyword overrides that are not None win over the URL."""
        parts = urlsplit(url)
        if parts.scheme not in PLAIN_SCHEMES + TLS_SCHEMES or not parts.hostname:
            raise ConfigError(f"MQTT URL {_redact(url)!r}: expected mqtt://host:port or mqtts://host:port")
        tls = parts.scheme in TLS_SCHEMES
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"MQTT URL {_redact(url)!r}: the port is not a number") from None
        fields: dict[str, Any] = {"host": parts.hostname, "port": port, "tls": tls,
                                  "username": unquote(parts.username) if parts.username else None,
                                  "password": unquote(parts.password) if parts.password else None}
        fields.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**fields)

    def redacted(self) -> str:
        """The endpoint as a URL with the password replaced by ***: for messages and logs."""
        user = ""
        if self.username:
            user = quote(self.username, safe="") + (":***" if self.password else "") + "@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def ca_label(self) -> str:
        return f"CA {self.ca_file}" if self.ca_file else "the system CA store"

    def ssl_context(self) -> ssl.SSLContext:
        """The client-side TLS context: CERT_REQUIRED, host name checked, the client certificate if configured."""
        for name in ("ca_file", "certfile", "keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"MQTT {name} {path} does not exist", path=str(path))
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None)
            if self.certfile is not None:
                context.load_cert_chain(str(self.certfile), str(self.keyfile) if self.keyfile else None)
        except ssl.SSLError as exc:
            raise ConfigError(f"MQTT TLS files cannot be loaded ({self.ca_file or ''} {self.certfile or ''}): "
                              f"{exc.reason or exc}") from None
        return context

    def apply(self, client: Any) -> None:
        """Give a paho client this endpoint's credentials and TLS settings (before connecting)."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(self.ssl_context())

    def probe_tls(self, timeout_s: float = 5.0) -> None:
        """One TLS handshake with the broker: ConfigError on a certificate problem; nothing if it is
        trusted, or if the broker cannot be reached at all (paho keeps retrying that)."""
        if not self.tls:
            return
        context = self.ssl_context()
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
                with context.wrap_socket(sock, server_hostname=self.host) as tls_sock:
                    # TLS 1.3 reports a refused client certificate only on the first read after the handshake:
                    # one round trip; a broker that is content sends nothing, so this wait is the probe's cost.
                    tls_sock.settimeout(min(timeout_s, 0.25))
                    try:
                        tls_sock.recv(1)
                    except (socket.timeout, TimeoutError):
                        pass
        except ssl.SSLCertVerificationError as exc:
            raise certificate_error(self, exc) from None
        except ssl.SSLError as exc:
            raise ConfigError(f"TLS with MQTT broker {self.redacted()} failed: {exc.reason or exc} "
                              "(does the broker want a client certificate, or another TLS version?)",
                              url=self.redacted()) from None
        except OSError:
            return


def certificate_error(endpoint: MqttEndpoint, exc: ssl.SSLCertVerificationError) -> ConfigError:
    """The one line a broker certificate the configured CA does not vouch for becomes."""
    reason = exc.verify_message or exc.reason or str(exc)
    return ConfigError(f"broker certificate not trusted by {endpoint.ca_label()}: {reason} "
                       f"({endpoint.redacted()})", url=endpoint.redacted())


def connect_client(client: Any, endpoint: MqttEndpoint, keepalive_s: int = 60, probe: bool = True) -> None:
    """Apply the endpoint to a paho client, refuse an untrusted broker (one ConfigError line), then
    connect_async: the caller starts the loop, and paho reconnects by itself from then on."""
    endpoint.apply(client)
    if probe:
        endpoint.probe_tls()
    client.connect_async(endpoint.host, endpoint.port, keepalive=keepalive_s)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[1]}").geturl()


def redact_url(url: str) -> str:
    """An MQTT URL without its password, for messages and logs (works on URLs that do not parse too)."""
    return _redact(url)


__all__ = ["MqttEndpoint", "certificate_error", "connect_client", "redact_url"]
