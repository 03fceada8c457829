"""Fetch a bundle over HTTP into `downloads/<id>.part`, resuming with `Range` after any interruption.

The `.part` file only ever holds a prefix of the bundle, so after a dropped connection, a timeout or
an agent restart the next try asks for `Range: bytes=<size of .part>-` and appends. A 206 whose
Content-Range does not start where the file ends, or a 200 (the server ignored Range), restarts from
zero. At the end the size and sha256 must equal the BundleRef's; only then is the file renamed to
`<id>.edgepack`. Failures that made no progress are retried `retries` times with exponential backoff
and full jitter (`edgepack.retry`: devices cut off by the same outage do not come back in lockstep);
any progress resets that count, so a slow, flaky link still gets there.

The URL of a BundleRef may be the fleet's own route or an absolute, expiring object-store URL
(presigned S3, or a CDN in front of it). Redirects are followed here, not by urllib, so the fleet
credential never goes to another origin; a 403/410 from another origin (a presigned URL that expired,
or a CDN that no longer has it) sends the download back to the fleet's route, which redirects to a
freshly signed URL, and the transfer resumes where it stopped.

Errors: `DownloadError` (retryable: the network or the server is at fault) and
`DownloadRefused` (permanent: 4xx, a size or hash mismatch twice, a bigger body than announced).
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from edgepack.errors import EdgepackError
from edgepack.files import file_sha256_size
from edgepack.protocol import BundleRef
from edgepack.retry import RetryPolicy

from device_agent.fleet_api import FleetClient

log = logging.getLogger(__name__)

_CONTENT_RANGE_PREFIX = "bytes "
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
# A URL of another origin answering one of these has expired or lost the file: ask the fleet again.
_STALE_URL = (401, 403, 404, 410)
# Fresh URLs from the fleet that fail in a row, without a byte of progress, before the download is refused.
_MAX_REFRESHES = 3


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # the downloader follows them itself: credentials and TLS trust are per origin


class _StaleUrl(Exception):
    def __init__(self, url: str, code: int, reason: str) -> None:
        super().__init__(f"HTTP {code} {reason}")
        self.url, self.code, self.reason = url, code, reason


class DownloadError(EdgepackError):
    """A download did not complete for a reason worth retrying later (network, server error)."""

    exit_code = 1


class DownloadRefused(DownloadError):
    """A download that retrying will not fix: refused by the server, or content that does not match."""


@dataclass(frozen=True)
class DownloadSettings:
    chunk_bytes: int = 1 << 20
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes_fetched: int  # over the network in this call (less than the size when resumed)
    resumed_from: int
    requests: int
    refreshes: int = 0  # times an expired or stale URL sent the download back to the fleet for a new one


class Downloader:
    """Downloads bundles for one device into `downloads_dir`."""

    def __init__(self, downloads_dir: Path, client: FleetClient, settings: DownloadSettings = DownloadSettings(), *,
                 should_stop: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        self.downloads_dir = Path(downloads_dir)
        self.client = client
        self.settings = settings
        self.should_stop = should_stop
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._policy = RetryPolicy(base_s=settings.backoff_s, max_s=max(settings.max_backoff_s, settings.backoff_s))

    def part_path(self, ref: BundleRef) -> Path:
        return self.downloads_dir / f"{ref.id}.part"

    def final_path(self, ref: BundleRef) -> Path:
        return self.downloads_dir / f"{ref.id}.edgepack"

    def fetch(self, ref: BundleRef, progress: Callable[[int, int], None] | None = None) -> DownloadResult:
        """Return the complete, hash-checked bundle file for `ref`, downloading what is missing."""
        final = self.final_path(ref)
        if final.is_file() and file_sha256_size(final) == (ref.sha256, ref.size):
            return DownloadResult(final, 0, ref.size, 0)
        final.unlink(missing_ok=True)

        url = self.client.resolve(ref.url)
        fleet_route = self.client.bundle_download_url(ref.id)
        part = self.part_path(ref)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        started_size = part.stat().st_size if part.exists() else 0
        fetched = requests = mismatches = refreshes = stale_in_a_row = 0
        backoff = self._policy.backoff(self._rng)
        while True:
            if self.should_stop():
                raise DownloadError(f"download of bundle {ref.id[:12]} interrupted: agent stopping", bundle_id=ref.id)
            have = part.stat().st_size if part.exists() else 0
            if have > ref.size:
                log.warning("%s is larger than the announced %d bytes; starting over", part.name, ref.size)
                part.unlink()
                have = 0
            if have == ref.size:
                if file_sha256_size(part) == (ref.sha256, ref.size):
                    os.replace(part, final)
                    return DownloadResult(final, fetched, started_size, requests, refreshes)
                part.unlink()
                mismatches += 1
                if mismatches >= 2:
                    raise DownloadRefused(f"bundle {ref.id[:12]}: downloaded content does not match the announced sha256 "
                                          "(twice); the fleet's copy or its BundleRef is wrong", bundle_id=ref.id)
                log.warning("bundle %s: sha256 mismatch after download; fetching it again from the start", ref.id[:12])
                continue
            requests += 1
            try:
                gained = self._fetch_range(url, part, have, ref, progress)
            except _StaleUrl as exc:
                gained = part.stat().st_size - have if part.exists() else 0
                fetched += max(gained, 0)
                stale_in_a_row = 0 if gained > 0 else stale_in_a_row + 1
                if stale_in_a_row > _MAX_REFRESHES:
                    raise DownloadRefused(f"download of bundle {ref.id[:12]} refused: {exc} from {_origin(exc.url)} "
                                          f"{stale_in_a_row} times in a row, with a fresh URL from the fleet each "
                                          "time", bundle_id=ref.id) from None
                refreshes += 1
                log.info("bundle %s: %s answered %s (an expired or stale URL); asking the fleet for a fresh one",
                         ref.id[:12], _origin(exc.url), exc)
                url = fleet_route
                continue
            except DownloadRefused:
                raise
            except (DownloadError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                gained = part.stat().st_size - have if part.exists() else 0
                fetched += max(gained, 0)
                if gained > 0:
                    backoff.reset()
                delay = backoff.next_delay()
                if backoff.failures > self.settings.retries:
                    raise DownloadError(f"download of bundle {ref.id[:12]} from {url} failed: {_reason(exc)} "
                                        f"({backoff.failures} tries without progress)", bundle_id=ref.id) from None
                log.info("download of %s interrupted at %d/%d bytes (%s); retrying in %.1f s",
                         ref.id[:12], have + max(gained, 0), ref.size, _reason(exc), delay)
                self._sleep(delay)
                continue
            fetched += gained
            backoff.reset()

    def _fetch_range(self, url: str, part: Path, have: int, ref: BundleRef,
                     progress: Callable[[int, int], None] | None) -> int:
        try:
            response, url = self._open(url, have)
        except urllib.error.HTTPError as exc:
            answered = exc.filename if isinstance(exc.filename, str) else url
            if exc.code in _STALE_URL and not self.client.same_origin(answered):
                raise _StaleUrl(answered, exc.code, str(exc.reason)) from None
            if exc.code == 416 and have:
                # The server thinks our prefix is past its end: our .part cannot belong to this file.
                log.warning("server answered 416 for %s at %d bytes; starting over", ref.id[:12], have)
                part.unlink(missing_ok=True)
                raise DownloadError("range not satisfiable; restarting") from None
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise DownloadRefused(f"download of bundle {ref.id[:12]} refused: HTTP {exc.code} {exc.reason} ({url})",
                                      bundle_id=ref.id) from None
            raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            untrusted = self.client.certificate_error(url, exc)
            if untrusted is not None:  # retrying will not make the certificate trusted
                raise DownloadRefused(f"download of bundle {ref.id[:12]} refused: {untrusted}", bundle_id=ref.id) from None
            raise
        with response:
            mode = "ab"
            if have and response.status == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != have:
                    log.warning("server resumed %s at byte %s, not %d; starting over", ref.id[:12], start, have)
                    part.unlink(missing_ok=True)
                    raise DownloadError("unexpected Content-Range; restarting")
            elif response.status == 200:
                if have:
                    log.info("server ignored Range for %s; downloading from the start", ref.id[:12])
                mode = "wb"
                have = 0
            else:
                raise DownloadError(f"unexpected HTTP {response.status}")
            written = 0
            with open(part, mode) as out:
                try:
                    while True:
                        if self.should_stop():
                            raise DownloadError("agent stopping")
                        chunk = response.read(self.settings.chunk_bytes)
                        if not chunk:
                            break
                        if have + written + len(chunk) > ref.size:
                            out.truncate(0)
                            raise DownloadRefused(f"bundle {ref.id[:12]}: the server sent more than the announced "
                                                  f"{ref.size} bytes", bundle_id=ref.id)
                        out.write(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(have + written, ref.size)
                finally:
                    out.flush()
                    os.fsync(out.fileno())
        if have + written < ref.size:
            raise DownloadError(f"connection ended at {have + written} of {ref.size} bytes")
        return written


    def _open(self, url: str, have: int) -> tuple[http.client.HTTPResponse, str]:
        """GET `url` from byte `have`, following redirects with each hop's own credentials and TLS trust.
        Returns the response and the URL that gave it; an HTTPError names the URL that answered it in
        `filename`."""
        for _ in range(_MAX_REDIRECTS + 1):
            headers = self.client.headers_for(url)
            if have:
                headers["Range"] = f"bytes={have}-"
            handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
            context = self.client.context_for(url)
            if context is not None:
                handlers.append(urllib.request.HTTPSHandler(context=context))
            opener = urllib.request.build_opener(*handlers)
            try:
                return opener.open(urllib.request.Request(url, headers=headers), timeout=self.settings.timeout_s), url
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if exc.code in _REDIRECTS else None
                if not location:
                    exc.filename = url
                    raise
                exc.close()
                url = urljoin(url, location)
        raise DownloadError(f"more than {_MAX_REDIRECTS} redirects")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-999/1000"
    if not value or not value.startswith(_CONTENT_RANGE_PREFIX):
        return None
    try:
        return int(value[len(_CONTENT_RANGE_PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed after {len(exc.partial)} more bytes"
    return str(exc) or type(exc).__name__


__all__ = ["DownloadError", "DownloadRefused", "DownloadResult", "DownloadSettings", "Downloader"]
