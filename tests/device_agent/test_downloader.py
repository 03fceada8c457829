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
