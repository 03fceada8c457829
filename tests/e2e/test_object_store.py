"""Issue 12, bundles from object storage, end to end: `edgepack fleet serve --bundle-store s3://…` on an
S3-compatible server (s3rver, testbeds/s3.py) behind a proxy that cuts one transfer, a secure Mosquitto,
real agents. The fleet verifies uploads and writes them to the bucket, desired states carry presigned
URLs, agents download from the store (the fleet serves no bundle bytes: counted in its /metrics), a
dropped transfer resumes with Range, and an agent whose URL expired gets a fresh one from the fleet."""

from __future__ import annotations

import calendar
import hashlib
import re
import time
import urllib.error
import urllib.request

import boto3
import pytest

from edgepack.signing import generate_keypair
from testbeds.fleet_harness import DesiredMonitor, FleetProcess, agent_configs, build_release, wait_for
from testbeds.mosquitto import MosquittoBroker
from testbeds.s3 import CuttingProxy

PROFILES = ["jetson-orin-nano", "x86-avx2"]
EXPIRES_S = 6


def _metric(fleet, name: str) -> float:
    with urllib.request.urlopen(f"{fleet.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} is not in the fleet's /metrics"
    return float(found.group(1))


def test_agents_download_from_presigned_urls_resume_and_refresh_an_expired_one(tmp_path, s3_server, monkeypatch):
    private, public = generate_keypair(tmp_path / "keys")
    release = build_release(tmp_path, private, "2.0.0", PROFILES)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)  # the fleet process reads its S3 credentials from boto3's usual chain
    bucket = boto3.session.Session().client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    with CuttingProxy(s3_server.port) as proxy, MosquittoBroker(secure=True) as broker, \
            FleetProcess.for_broker(broker, tmp_path, trusted_key=public, extra_args=[
                "--bundle-store", f"s3://{s3_server.bucket}/fleet", "--s3-endpoint-url", proxy.url,
                "--presign-expires-s", str(EXPIRES_S)]) as fleet:
        client = fleet.client()
        ids = [client.upload(path)["id"] for path in release]
        keys = sorted(item["Key"] for item in bucket.list_objects_v2(Bucket=s3_server.bucket, Prefix="fleet/")["Contents"])
        assert keys == sorted(f"fleet/{i[:2]}/{i}" for i in ids), "the verified uploads are in the bucket"
        on_disk = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "fleet-data").rglob("*") if p.is_file()}
        assert not on_disk & set(ids), "no bundle is kept on the fleet's disk (staged uploads are removed)"
        token = client.request("POST", "/devices/enrollment-tokens", json={"labels": {"fleet": "s3"}, "uses": 3})["token"]
        agents = agent_configs(tmp_path, 3, PROFILES, fleet.url, broker.url, token, public,
                               extra={"require_signed_desired": True})
        late = agents[-1]
        monitor = DesiredMonitor(broker.fleet_url)
        try:
            for agent in agents:
                agent.start()
            wait_for(lambda: len(client.request("GET", "/devices")) == 3, 60, what="enrollments")
            late.stop()  # offline while the rollout starts: its presigned URL expires before it is back
            size = {b["id"]: b["size_bytes"] for b in client.request("GET", "/bundles")}
            proxy.arm(cut_after=min(size.values()) // 2, cuts=1)  # the first bundle transfer drops midway
            rollout = client.request("POST", "/rollouts", json={
                "bundle_id": ids[0], "selector": {"fleet": "s3"}, "waves": [100], "gates": ["install_failure_ratio<=0"],
                "bake_s": 1, "min_reports": 1, "install_timeout_s": 180})
            wait_for(lambda: sum(1 for m in client.request("GET", f"/rollouts/{rollout['id']}")["members"]
                                 if m["phase"] == "active") == 2, 120, what="the two online agents to install")
            desired = monitor.per_device()[late.device_id][-1]
            url = desired["bundle"]["url"]
            assert url.startswith(proxy.url + f"/{s3_server.bucket}/fleet/") and "X-Amz-Expires=" in url, \
                "the desired state names the presigned object URL"
            issued = calendar.timegm(time.strptime(re.search(r"X-Amz-Date=(\d{8}T\d{6})Z", url).group(1), "%Y%m%dT%H%M%S"))
            time.sleep(max(0.0, issued + EXPIRES_S + 1 - time.time()))  # the late device's URL has expired
            late.start()
            final = wait_for(lambda: (r := client.request("GET", f"/rollouts/{rollout['id']}"))["status"] in
                             ("succeeded", "rolled_back", "paused", "aborted") and r, 180, what="the rollout to finish")
            assert final["status"] == "succeeded", final["decisions"]
            devices = client.request("GET", "/devices")
            assert {d["current_bundle_id"] for d in devices} <= set(ids) and all(d["phase"] == "active" for d in devices)

            # The fleet served no bundle bytes; the late agent came back to it once and was redirected.
            assert _metric(fleet, "edgepack_bundle_bytes_served") == 0
            assert _metric(fleet, "edgepack_bundle_redirects") >= 1
            gets = [r for r in proxy.requests if r.startswith("GET /" + s3_server.bucket)]
            assert all("X-Amz-Signature=" in r.split("\r\n", 1)[0] for r in gets), "devices GET presigned URLs only"
            assert proxy.cut == 1
            resumed = [r for r in gets if re.search(r"^range: bytes=[1-9]\d*-", r, re.I | re.M)]
            assert resumed, "the dropped transfer resumed with a Range from where it stopped"
            assert "Authorization" not in "".join(gets), "the device credential never reaches the store"
        finally:
            monitor.close()
            for agent in agents:
                agent.stop()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_download_route_redirects_to_the_store(tmp_path, s3_server, monkeypatch, method):
    private, public = generate_keypair(tmp_path / "keys")
    release = build_release(tmp_path, private, "2.0.0", PROFILES[:1])
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    with MosquittoBroker(secure=True) as broker, FleetProcess.for_broker(broker, tmp_path, trusted_key=public, extra_args=[
            "--bundle-store", f"s3://{s3_server.bucket}/route", "--s3-endpoint-url", s3_server.endpoint_url]) as fleet:
        bundle_id = fleet.client().upload(release[0])["id"]

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        request = urllib.request.Request(f"{fleet.url}/api/v1/bundles/{bundle_id}/download", method=method,
                                         headers={"Authorization": f"Bearer {fleet.admin_token}"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.build_opener(NoRedirect).open(request, timeout=10)
        assert answer.value.code == 307
        location = answer.value.headers["Location"]
        assert location.startswith(f"{s3_server.endpoint_url}/{s3_server.bucket}/route/{bundle_id[:2]}/{bundle_id}?")
        assert answer.value.headers["Cache-Control"] == "no-store"
        with urllib.request.urlopen(location, timeout=10) as response:
            assert response.read() == release[0].read_bytes()
