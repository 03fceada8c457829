"""Device agent fixtures: real bundles built once per session, a bundle server with Range, MQTT helpers.

`BundleServer` stands in for the fleet's routes the agent uses (enroll, download with Range, status);
it is a real HTTP server on loopback, and it can drop a transfer midway to test resumption. The e2e
tests run the agent against the real fleet.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import shutil
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgepack.manifest import BundleManifest
from edgepack.protocol import BundleRef, DeviceStatus, decode, status_topic
from tests.support import REPO

DIGITS_CONFIG = REPO / "examples" / "digits" / "edgepack.yaml"


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    ref: BundleRef
    manifest: BundleManifest


@dataclass(frozen=True)
class BundleSet:
    keys_dir: Path
    public_key: Path
    v1: BuiltBundle
    v2: BuiltBundle
    wrong_profile: BuiltBundle  # a real rpi5 build
    selftest_fails: BuiltBundle  # v2's members, self-test expecting zeros, signed with the trusted key
    tampered: BuiltBundle  # v2 with one model byte flipped after signing
    untrusted: BuiltBundle  # v2's content signed with a key the device does not trust
    other_runtime: BuiltBundle  # manifest says runtime "rknn", which no adapter of this agent runs
    onnx: BuiltBundle  # v1 with the digits float ONNX model and its own self-test: runtime onnxruntime
    onnx_as_tensorrt: BuiltBundle  # the same with runtime "tensorrt" (served from the ONNX on the CPU)

    def all(self) -> list[BuiltBundle]:
        return [self.v1, self.v2, self.wrong_profile, self.selftest_fails, self.tampered, self.untrusted, self.other_runtime,
                self.onnx, self.onnx_as_tensorrt]


def _ref(path: Path, manifest: BundleManifest) -> BuiltBundle:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ref = BundleRef(id=digest, name=manifest.name, version=manifest.version, profile=manifest.profile,
                    sha256=digest, size=path.stat().st_size, url=f"/api/v1/bundles/{digest}/download")
    return BuiltBundle(path=path, ref=ref, manifest=manifest)


def _build(root: Path, key: Path, *, version: str, profile: str) -> BuiltBundle:
    from builder.pipeline import BuildRequest, run_build
    from edgepack.bundle import read_manifest_unverified

    config = yaml.safe_load(DIGITS_CONFIG.read_text())
    base = DIGITS_CONFIG.parent
    config["version"] = version
    config["model"] = str(base / config["model"])
    config["data"] = {name: str(base / value) for name, value in config["data"].items()}
    project = root / f"project-{version}-{profile}"
    project.mkdir()
    (project / "edgepack.yaml").write_text(yaml.safe_dump(config))
    result = run_build(BuildRequest(config_path=project / "edgepack.yaml", profile=profile, out_dir=root / "dist",
                                    signing_key=key, cache_dir=root / "cache"))
    assert result.exit_code == 0, result.report.selection_reason
    path = next(p for p in result.outputs if p.suffix == ".edgepack")
    return _ref(path, read_manifest_unverified(path))


def _rewrite(source: Path, dest: Path, key, *, manifest_update: dict | None = None,
             member_update: dict[str, bytes] | None = None) -> BuiltBundle:
    """A new bundle from `source`'s members and manifest with some replaced, signed with `key`."""
    from edgepack.bundle import inspect_bundle, write_bundle

    described = inspect_bundle(source)
    manifest = {k: v for k, v in described["manifest"].items() if k not in ("format", "files")}
    manifest.update(manifest_update or {})
    members: dict[str, bytes] = {}
    with tarfile.open(source) as tar:
        for row in described["files"]:
            members[row["path"]] = tar.extractfile(row["path"]).read()
    members.update(member_update or {})
    info = write_bundle(dest, members, manifest, key)
    return _ref(info.path, info.manifest)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _onnx_bundle(source: Path, dest: Path, key, *, runtime: str) -> BuiltBundle:
    """`source` (a tflite bundle) remade around the digits float ONNX, with a self-test computed by onnxruntime.

    The builder picks the profile's preferred runtime, so this is how the tests get onnxruntime and
    tensorrt bundles for the same profile without depending on that choice.
    """
    import onnxruntime

    model = DIGITS_CONFIG.parent / "model.onnx"
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    samples = np.load(DIGITS_CONFIG.parent / "data" / "val.npz")["input"][:3].astype(np.float32)
    members = {"model/model.onnx": model.read_bytes()}
    cases = []
    for index, sample in enumerate(samples):
        feed = {"input": sample.reshape(1, 1, 8, 8)}
        (logits,) = session.run(["logits"], feed)
        members[f"selftest/{index}/in0.npy"] = _npy(feed["input"])
        members[f"selftest/{index}/out0.npy"] = _npy(logits.astype(np.float32))
        cases.append({"inputs": {"input": f"selftest/{index}/in0.npy"}, "outputs": {"logits": f"selftest/{index}/out0.npy"}})
    members["selftest/cases.json"] = json.dumps({"schema_version": 1, "runtime": runtime,
                                                 "tolerance": {"atol": 1e-4, "rtol": 1e-3}, "cases": cases}).encode()
    members["reference/stats.json"] = _member(source, "reference/stats.json")
    from edgepack.bundle import read_manifest_unverified, write_bundle

    manifest = {k: v for k, v in read_manifest_unverified(source).to_json_dict().items() if k not in ("format", "files", "io_quantization")}
    manifest.update({"version": "1.0.0-" + runtime, "runtime": runtime, "model": "model/model.onnx",
                     "model_files": ["model/model.onnx"], "model_format": "onnx", "precision": "fp32",
                     "execution_providers": ["CPUExecutionProvider"], "delegates": []})
    members["sbom.cdx.json"] = _member(source, "sbom.cdx.json")
    info = write_bundle(dest, members, manifest, key)
    return _ref(info.path, info.manifest)


def _zeros_like_npy(data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros_like(np.load(io.BytesIO(data))), allow_pickle=False)
    return buffer.getvalue()


def _flip_model_byte(source: Path, dest: Path, member: str) -> BuiltBundle:
    shutil.copyfile(source, dest)
    with tarfile.open(dest) as tar:
        info = tar.getmember(member)
    data = bytearray(dest.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0xFF
    dest.write_bytes(bytes(data))
    from edgepack.bundle import read_manifest_unverified

    return _ref(dest, read_manifest_unverified(dest))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> BundleSet:
    from edgepack.signing import generate_keypair, load_private_key

    root = tmp_path_factory.mktemp("agent-bundles")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(root / "config"))
        patch.setenv("EDGEPACK_CACHE_DIR", str(root / "cache"))
        patch.delenv("SOURCE_DATE_EPOCH", raising=False)
        private, public = generate_keypair(root / "keys")
        other_private, _ = generate_keypair(root / "other-keys")
        v1 = _build(root, private, version="1.0.0", profile="rpi4")
        v2 = _build(root, private, version="2.0.0", profile="rpi4")
        wrong = _build(root, private, version="2.0.0", profile="rpi5")
        key = load_private_key(private)
        cases = json.loads(_member(v2.path, "selftest/cases.json"))
        zeros = {member: _zeros_like_npy(_member(v2.path, member))
                 for case in cases["cases"] for member in case["outputs"].values()}
        bad_dir = root / "bad"
        selftest_fails = _rewrite(v2.path, bad_dir / "selftest-fails.edgepack", key,
                                  manifest_update={"version": "3.0.0"}, member_update=zeros)
        tampered = _flip_model_byte(v2.path, bad_dir / "tampered.edgepack", v2.manifest.model)
        untrusted = _rewrite(v2.path, bad_dir / "untrusted.edgepack", load_private_key(other_private),
                             manifest_update={"version": "2.0.1"})
        other_runtime = _rewrite(v2.path, bad_dir / "rknn.edgepack", key,
                                 manifest_update={"version": "2.0.2", "runtime": "rknn"})
        onnx = _onnx_bundle(v1.path, bad_dir / "onnx.edgepack", key, runtime="onnxruntime")
        onnx_as_tensorrt = _onnx_bundle(v1.path, bad_dir / "tensorrt.edgepack", key, runtime="tensorrt")
    return BundleSet(keys_dir=root / "keys", public_key=public, v1=v1, v2=v2, wrong_profile=wrong,
                     selftest_fails=selftest_fails, tampered=tampered, untrusted=untrusted, other_runtime=other_runtime,
                     onnx=onnx, onnx_as_tensorrt=onnx_as_tensorrt)


def _member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


# ---------------------------------------------------------------------------------------------------
# the bundle server (the fleet's download, enroll and status routes)


@dataclass
class RequestLog:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int


@dataclass
class BundleServer:
    """A real HTTP server on loopback with the fleet routes the agent calls."""

    files: dict[str, Path] = field(default_factory=dict)
    enrollment_tokens: set[str] = field(default_factory=set)
    credentials: dict[str, str] = field(default_factory=dict)  # device id → credential
    drop_once: dict[str, int] = field(default_factory=dict)  # bundle id → bytes to send before cutting the connection
    ignore_range: bool = False
    requests: list[RequestLog] = field(default_factory=list)
    statuses: list[dict] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, bundle: BuiltBundle) -> BundleRef:
        self.files[bundle.ref.id] = bundle.path
        return bundle.ref

    def downloads(self, bundle_id: str | None = None) -> list[RequestLog]:
        with self.lock:
            return [r for r in self.requests if r.path.endswith("/download") and (bundle_id is None or bundle_id in r.path)]


_DOWNLOAD = re.compile(r"^/api/v1/bundles/([0-9a-f]{64})/download$")
_STATUS = re.compile(r"^/api/v1/devices/([^/]+)/status$")


def _handler(server: BundleServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            return None

        def _log(self, status: int) -> None:
            with server.lock:
                server.requests.append(RequestLog(self.command, self.path, self.headers.get("Range"),
                                                  self.headers.get("Authorization"), status))

        def _json(self, status: int, document: dict) -> None:
            body = json.dumps(document).encode()
            self._log(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") in {f"Bearer {c}" for c in server.credentials.values()}

        def do_GET(self) -> None:
            match = _DOWNLOAD.match(self.path)
            if not match or match.group(1) not in server.files:
                return self._json(404, {"detail": "no such bundle"})
            if not self._authorized():
                return self._json(401, {"detail": "missing or wrong device credential"})
            data = server.files[match.group(1)].read_bytes()
            start = 0
            range_header = self.headers.get("Range")
            if range_header and not server.ignore_range:
                found = re.fullmatch(r"bytes=(\d+)-", range_header)
                start = int(found.group(1)) if found else 0
                if start >= len(data):
                    self._log(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            status = 206 if start else 200
            body = data[start:]
            self._log(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            with server.lock:
                cut = server.drop_once.pop(match.group(1), None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/api/v1/devices/enroll":
                if body.get("token") not in server.enrollment_tokens:
                    return self._json(401, {"detail": "invalid enrollment token"})
                server.enrollment_tokens.discard(body["token"])
                credential = "dc_" + secrets.token_hex(16)
                server.credentials[body["device_id"]] = credential
                return self._json(200, {"device_id": body["device_id"], "credential": credential})
            match = _STATUS.match(self.path)
            if match:
                if self.headers.get("Authorization") != f"Bearer {server.credentials.get(match.group(1))}":
                    return self._json(401, {"detail": "wrong device credential"})
                with server.lock:
                    server.statuses.append(body)
                return self._json(200, {"ok": True})
            return self._json(404, {"detail": "not found"})

    return Handler


@pytest.fixture
def bundle_server():
    server = BundleServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="bundle-server", daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------------------------------
# MQTT helpers


class StatusWatcher:
    """Collects every DeviceStatus a device publishes, from a real MQTT subscription."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.device_id = device_id
        self.statuses: list[DeviceStatus] = []
        self._cond = threading.Condition()
        port = int(broker_url.rsplit(":", 1)[1])
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{device_id}-{secrets.token_hex(3)}")
        self._subscribed = threading.Event()
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_connect = lambda client, *args: client.subscribe(status_topic(device_id), qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._subscribed.wait(5), "status watcher did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        if not message.payload:
            return
        status = decode(DeviceStatus, message.payload)
        with self._cond:
            self.statuses.append(status)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 15.0) -> DeviceStatus:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for status in self.statuses:
                    if predicate(status):
                        return status
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(s.seq, s.phase, s.state, s.error) for s in self.statuses]
                    raise AssertionError(f"no matching status within {timeout} s; seen: {seen}")
                self._cond.wait(remaining)

    def phases(self, seq: int) -> list[str]:
        with self._cond:
            return [s.phase for s in self.statuses if s.seq == seq and s.state == "online"]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def publish_desired(broker_url: str, device_id: str, payload: bytes, *, retain: bool = True) -> None:
    import paho.mqtt.client as mqtt

    from edgepack.protocol import desired_topic

    port = int(broker_url.rsplit(":", 1)[1])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-{secrets.token_hex(4)}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(desired_topic(device_id), payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()  # before loop_stop, which otherwise waits out the loop's 1 s select
        client.loop_stop()


def agent_config(tmp_path: Path, bundles: BundleSet, *, fleet_url: str, mqtt_url: str = "mqtt://127.0.0.1:1",
                 device_id: str = "dev-1", **overrides):
    from device_agent.config import AgentConfig

    data = {
        "device_id": device_id, "profile": "rpi4", "fleet_url": fleet_url, "mqtt_url": mqtt_url,
        "state_dir": str(tmp_path / f"state-{device_id}"), "trusted_keys": [str(bundles.public_key)],
        "labels": {"site": "lab"}, "download": {"backoff_s": 0.01, "retry_interval_s": 0.2},
        "selftest_timeout_s": 30,
    }
    data.update(overrides)
    return AgentConfig.from_mapping(data)
