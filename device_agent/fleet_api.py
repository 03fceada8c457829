"""The few fleet HTTP routes the agent calls, over the standard library (no HTTP client dependency).

    POST {fleet_url}/api/v1/devices/enroll          {device_id, profile, labels, token} → {device_id, credential,
                                                                                            fleet_key}
    GET  {fleet_url}/api/v1/bundles/{id}/download   Authorization: Bearer <credential>, Range: bytes=N-
    POST {fleet_url}/api/v1/devices/{id}/status     a DeviceStatus (optional; MQTT is the main channel)

Bundle URLs in a desired state may be relative to the fleet URL. The device credential is only ever
sent to the fleet's own origin, never to a third-party URL a desired state names. An https:// fleet is
verified against `ssl_context` (the agent's `ca_file`, host name included; the system store without one);
a certificate it does not vouch for is a ConfigError line ("fleet certificate not trusted by ..."), never
retried: waiting will not make it trusted.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

from edgepack import __version__
from edgepack.errors import ConfigError, EdgepackError
from edgepack.retry import RetryPolicy, RetryStopped, retry_call, stoppable_sleep

log = logging.getLogger(__name__)

USER_AGENT = f"edgepack-agent/{__version__}"
_MAX_JSON_RESPONSE = 1 << 20


class EnrollmentError(EdgepackError):
    """The fleet could not be reached to enroll (retryable; a refusal is a ConfigError)."""

    exit_code = 1


class FleetClient:
    """Fleet URLs and credentials for one device."""

    def __init__(self, fleet_url: str, device_id: str, *, credential: str | None = None, timeout_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, ca_label: str = "the system CA store") -> None:
        self.fleet_url = fleet_url.rstrip("/")
        self.device_id = device_id
        self.credential = credential
        self.fleet_key: dict | None = None  # the director key the last enrollment answer carried
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self.ca_label = ca_label
        parts = urlsplit(self.fleet_url)
        self._origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    def resolve(self, url: str) -> str:
        """An absolute URL for `url`; a relative one is appended to the fleet URL (keeping its path prefix)."""
        if urlsplit(url).scheme:
            return url
        return self.fleet_url + (url if url.startswith("/") else "/" + url)

    def same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return (parts.scheme, parts.hostname, port) == self._origin

    def context_for(self, url: str) -> ssl.SSLContext | None:
        """The fleet's TLS context for its own origin; other https:// URLs use the system store."""
        return self.ssl_context if self.same_origin(url) else None

    def certificate_error(self, url: str, exc: BaseException) -> ConfigError | None:
        """The one line an untrusted server certificate becomes, or None for any other failure."""
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if not isinstance(reason, ssl.SSLCertVerificationError):
            return None
        who = "fleet" if self.same_origin(url) else urlsplit(url).hostname
        label = self.ca_label if self.same_origin(url) else "the system CA store"
        return ConfigError(f"{who} certificate not trusted by {label}: {reason.verify_message or reason.reason} "
                           f"({urlsplit(url).scheme}://{urlsplit(url).netloc})", device_id=self.device_id)

    def bundle_download_url(self, bundle_id: str) -> str:
        """The fleet's own download route of a bundle (it redirects to a fresh URL when bundles live in an
        object store)."""
        return f"{self.fleet_url}/api/v1/bundles/{bundle_id}/download"

    def headers_for(self, url: str) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        if self.credential and self.same_origin(url):
            headers["Authorization"] = f"Bearer {self.credential}"
        return headers

    def enroll(self, *, profile: str, labels: dict[str, str], token: str) -> str:
        """Present the one-time enrollment token; return the device credential (the fleet's director key, when
        the answer has one, is left in `self.fleet_key` for the caller to pin).

        A refusal (4xx) is a ConfigError naming the status and the fleet's reason; an unreachable
        fleet or a 5xx is an EnrollmentError the caller may retry.
        """
        url = f"{self.fleet_url}/api/v1/devices/enroll"
        body = {"device_id": self.device_id, "profile": profile, "labels": labels, "token": token}
        try:
            document = self._post_json(url, body, authorized=False)
        except urllib.error.HTTPError as exc:
            reason = _error_detail(exc)
            if 400 <= exc.code < 500:
                raise ConfigError(f"enrollment refused by {self.fleet_url}: HTTP {exc.code} {reason}",
                                  device_id=self.device_id) from None
            raise EnrollmentError(f"enrollment failed at {self.fleet_url}: HTTP {exc.code} {reason}",
                                  device_id=self.device_id) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            untrusted = self.certificate_error(url, exc)
            if untrusted is not None:
                raise untrusted from None
            raise EnrollmentError(f"cannot reach the fleet at {self.fleet_url} to enroll: {_reason(exc)}",
                                  device_id=self.device_id) from None
        credential = document.get("credential") if isinstance(document, dict) else None
        if not isinstance(credential, str) or not credential:
            raise EnrollmentError(f"enrollment answer from {self.fleet_url} has no credential", device_id=self.device_id)
        fleet_key = document.get("fleet_key")
        self.fleet_key = fleet_key if isinstance(fleet_key, dict) else None
        return credential

    def post_status(self, payload: bytes) -> None:
        """Best effort: log and drop on any failure (MQTT carries the same status)."""
        url = f"{self.fleet_url}/api/v1/devices/{self.device_id}/status"
        request = urllib.request.Request(url, data=payload, method="POST",
                                         headers={**self.headers_for(url), "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context_for(url)) as response:
                response.read(_MAX_JSON_RESPONSE)
        except (urllib.error.URLError, OSError) as exc:
            log.info("status over HTTP not delivered: %s", _reason(exc))

    def _post_json(self, url: str, body: dict, *, authorized: bool = True) -> object:
        headers = self.headers_for(url) if authorized else {"User-Agent": USER_AGENT}
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={**headers, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context_for(url)) as response:
            return json.loads(response.read(_MAX_JSON_RESPONSE))


def enroll_until_done(client: FleetClient, *, profile: str, labels: dict[str, str], token: str,
                      should_stop: Callable[[], bool], backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                      rng: random.Random | None = None) -> str | None:
    """Retry enrollment while the fleet is unreachable; None when stopped first. Refusals raise.

    Waits are jittered (`edgepack.retry`), so a fleet coming back from an outage is not met by every
    waiting device at the same instant."""
    policy = RetryPolicy(base_s=backoff_s, max_s=max(max_backoff_s, backoff_s))
    try:
        return retry_call(lambda: client.enroll(profile=profile, labels=labels, token=token), policy=policy,
                          retry_on=(EnrollmentError,), sleep=stoppable_sleep(should_stop), rng=rng,
                          should_stop=should_stop,
                          on_retry=lambda exc, delay: log.warning("%s; retrying in %.1f s", exc, delay))
    except RetryStopped:
        return None


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read(4096)
        document = json.loads(body)
        detail = document.get("detail") if isinstance(document, dict) else None
        if detail:
            return str(detail)[:200]
        return body.decode(errors="replace")[:200]
    except (ValueError, OSError):
        return exc.reason if isinstance(exc.reason, str) else ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
