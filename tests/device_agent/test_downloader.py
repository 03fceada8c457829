"""Downloads resume with Range after an interruption and are checked against the BundleRef."""

from __future__ import annotations

import pytest

from device_agent.downloader import Downloader, DownloadError, DownloadRefused, DownloadSettings
from device_agent.fleet_api import FleetClient

SETTINGS = DownloadSettings(chunk_bytes=4096, retries=3, backoff_s=0.01, timeout_s=5)


def _downloader(tmp_path, server, credential="dc_test") -> Downloader:
    server.credentials["dev-1"] = credential
    return Downloader(tmp_path / "downloads", FleetClient(server.url, "dev-1", credential=credential), SETTINGS)


def test_download_resumes_after_the_server_drops_the_connection(tmp_path, bundle_server, bundles):
    ref = bundle_server.add(bundles.v1)
    half = ref.size // 2
    bundle_server.drop_once[ref.id] = half
    downloader = _downloader(tmp_path, bundle_server)

    result = downloader.fetch(ref)

    assert result.path.read_bytes() == bundles.v1.path.read_bytes()
    requests = bundle_server.downloads(ref.id)
    assert [(r.status, r.range) for r in requests] == [(200, None), (206, f"bytes={half}-")]
    assert result.bytes_fetched == ref.size  # nothing fetched twice
    assert not downloader.part_path(ref).exists()


def test_a_part_file_left_by_an_earlier_run_is_resumed(tmp_path, bundle_server, bundles):
    ref = bundle_server.add(bundles.v2)
    downloader = _downloader(tmp_path, bundle_server)
    part = downloader.part_path(ref)
    part.parent.mkdir(parents=True)
    part.write_bytes(bundles.v2.path.read_bytes()[:1000])

    result = downloader.fetch(ref)

    assert result.resumed_from == 1000 and result.bytes_fetched == ref.size - 1000
    assert [r.range for r in bundle_server.downloads(ref.id)] == ["bytes=1000-"]
    assert result.path.read_bytes() == bundles.v2.path.read_bytes()


def test_a_server_that_ignores_range_still_gives_a_correct_file(tmp_path, bundle_server, bundles):
    ref = bundle_server.add(bundles.v1)
    bundle_server.ignore_range = True
    bundle_server.drop_once[ref.id] = 5000
    downloader = _downloader(tmp_path, bundle_server)

    result = downloader.fetch(ref)

    assert result.path.read_bytes() == bundles.v1.path.read_bytes()
    assert [r.status for r in bundle_server.downloads(ref.id)] == [200, 200]


def test_content_that_does_not_match_the_announced_sha256_is_refused(tmp_path, bundle_server, bundles):
    good = bundle_server.add(bundles.v1)
    wrong = good.model_copy(update={"sha256": "0" * 64})
    downloader = _downloader(tmp_path, bundle_server)

    with pytest.raises(DownloadRefused, match="does not match the announced sha256"):
        downloader.fetch(wrong)
    assert not downloader.part_path(wrong).exists() and not downloader.final_path(wrong).exists()


def test_a_refused_credential_is_final_and_an_unreachable_server_is_retryable(tmp_path, bundle_server, bundles):
    ref = bundle_server.add(bundles.v1)
    bundle_server.credentials["dev-1"] = "dc_right"
    refused = Downloader(tmp_path / "d1", FleetClient(bundle_server.url, "dev-1", credential="dc_wrong"), SETTINGS)
    with pytest.raises(DownloadRefused, match="HTTP 401"):
        refused.fetch(ref)

    unreachable = Downloader(tmp_path / "d2", FleetClient("http://127.0.0.1:9", "dev-1", credential="x"), SETTINGS)
    with pytest.raises(DownloadError, match="4 tries without progress") as caught:
        unreachable.fetch(ref)
    assert not isinstance(caught.value, DownloadRefused)


def test_the_credential_goes_only_to_the_fleet_origin():
    client = FleetClient("http://fleet.local:8000/prefix", "dev-1", credential="dc_secret")

    assert client.resolve("/api/v1/bundles/x/download") == "http://fleet.local:8000/prefix/api/v1/bundles/x/download"
    assert client.headers_for(client.resolve("/api/v1/x"))["Authorization"] == "Bearer dc_secret"
    assert "Authorization" not in client.headers_for("http://cdn.example/bundle.edgepack")
    assert "Authorization" not in client.headers_for("https://fleet.local:8000/x")


class _Origin:
    """A loopback HTTP server whose GET answers come from `answer(path, headers) -> (status, headers, body)`."""

    def __init__(self, answer) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[tuple[str, dict[str, str]]] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                origin.seen.append((self.path, dict(self.headers)))
                status, headers, body = answer(self.path, self.headers)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_expired_store_url_goes_back_to_the_fleet_and_the_credential_never_leaves_its_origin(tmp_path, bundles):
    from edgepack.protocol import BundleRef

    payload = bundles.v1.path.read_bytes()
    ref = bundles.v1.ref
    expired = {"left": 2}  # the store refuses two URLs (the stale one, a fresh one), then serves the next with Range

    def store_answer(path, headers):
        if "fresh" not in path or expired["left"] > 0:
            expired["left"] -= 1
            return 403, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
        start = int(headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        return (206 if start else 200), ({"Content-Range": f"bytes {start}-{len(payload) - 1}/{len(payload)}"} if start else {}), payload[start:]

    store = _Origin(store_answer)
    fleet = _Origin(lambda path, headers: (307, {"Location": f"{store.url}/bucket/{ref.id}?fresh=1"}, b""))
    try:
        part = tmp_path / "downloads" / f"{ref.id}.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(payload[:1000])  # an earlier try got this far
        stale = BundleRef(**{**ref.model_dump(), "url": f"{store.url}/bucket/{ref.id}?expired=1"})
        downloader = Downloader(tmp_path / "downloads", FleetClient(fleet.url, "dev-1", credential="dc_secret"), SETTINGS)

        result = downloader.fetch(stale)

        assert result.path.read_bytes() == payload and result.refreshes == 2 and result.resumed_from == 1000
        assert [path for path, _ in fleet.seen] == [f"/api/v1/bundles/{ref.id}/download"] * 2
        assert all(headers.get("Authorization") == "Bearer dc_secret" for _, headers in fleet.seen)
        assert store.seen and not any("Authorization" in headers for _, headers in store.seen)
        assert store.seen[-1][1]["Range"] == "bytes=1000-", "the transfer resumed where the earlier try stopped"

        # A store that refuses every fresh URL too: refused after three of them, not retried forever.
        expired["left"] = 10**6
        (tmp_path / "downloads" / f"{ref.id}.edgepack").unlink()
        with pytest.raises(DownloadRefused, match="fresh URL from the fleet each time"):
            downloader.fetch(stale)
    finally:
        store.close()
        fleet.close()
