"""Helpers for the telemetry, shadow and safety tests: real agents on a real Mosquitto, and a telemetry subscriber.

Import the fixture into a test module (`from tests.device_agent.agent_harness import agents`) to use it.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from edgepack.clock import SYSTEM_CLOCK, Clock
from edgepack.protocol import BundleRef, DesiredState, Telemetry, decode, encode, telemetry_topic
from tests.device_agent.conftest import DIGITS_CONFIG, BuiltBundle, StatusWatcher, agent_config, publish_desired

VAL_INPUTS = np.load(DIGITS_CONFIG.parent / "data" / "val.npz")["input"].astype(np.float32)


class TelemetryWatcher:
    """Every Telemetry a device publishes, decoded with edgepack.protocol.decode, in arrival order."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[Telemetry] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        port = int(broker_url.rsplit(":", 1)[1])
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"telemetry-{device_id}-{secrets.token_hex(3)}")
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_connect = lambda client, *args: client.subscribe(telemetry_topic(device_id), qos=1)
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._subscribed.wait(5), "telemetry watcher did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        telemetry = decode(Telemetry, message.payload)
        with self._cond:
            self.messages.append(telemetry)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 15.0) -> Telemetry:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(m.bundle_id and m.bundle_id[:8], m.inferences, m.errors) for m in self.messages]
                    raise AssertionError(f"no matching telemetry within {timeout} s; seen: {seen}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def agents(tmp_path, bundles, bundle_server, mosquitto, request):
    """start(**config overrides, clock=…) → (agent, status watcher, telemetry watcher); every bundle is on the server.

    With `clock=FakeClock()` the agent's telemetry windows and safety watch move only when the test advances it."""
    for bundle in bundles.all():
        bundle_server.add(bundle)
    started: list[Agent] = []
    closers = []

    def start(device_id: str | None = None, *, clock: Clock = SYSTEM_CLOCK,
              **overrides) -> tuple[Agent, StatusWatcher, TelemetryWatcher]:
        device_id = device_id or f"{request.node.name[5:36].replace('_', '-')}-{secrets.token_hex(2)}"
        token = f"et_{secrets.token_hex(4)}"
        bundle_server.enrollment_tokens.add(token)
        overrides.setdefault("enrollment_token", token)
        overrides.setdefault("selftest_isolation", "thread")
        config = agent_config(tmp_path, bundles, fleet_url=bundle_server.url, mqtt_url=mosquitto.url, device_id=device_id,
                              **overrides)
        statuses = StatusWatcher(mosquitto.url, device_id)
        telemetry = TelemetryWatcher(mosquitto.url, device_id)
        closers.extend([statuses.close, telemetry.close])
        agent = Agent(config, clock=clock)
        started.append(agent)
        agent.start()
        assert agent.wait_connected(10)
        return agent, statuses, telemetry

    yield start
    for agent in started:
        agent.stop()
    for close in closers:
        close()


def desire(broker_url: str, agent: Agent, seq: int, bundle: BuiltBundle | None, action: str = "install") -> None:
    message = DesiredState(rollout_id="r-1", seq=seq, action=action, bundle=bundle.ref if bundle else None)
    publish_desired(broker_url, agent.device_id, encode(message))


def install(broker_url: str, agent: Agent, statuses: StatusWatcher, seq: int, bundle: BuiltBundle) -> None:
    desire(broker_url, agent, seq, bundle)
    final = statuses.wait_for(lambda s: s.seq == seq and s.phase in ("active", "failed"), timeout=30)
    assert final.phase == "active", final.error
    wait_until(lambda: agent.engine.active_bundle_id == bundle.ref.id)


def wait_until(condition, timeout: float = 15.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


def samples(count: int, *, offset: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` validation digits as single-sample requests."""
    return [{"input": VAL_INPUTS[(offset + i) % len(VAL_INPUTS)][None]} for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# a signed onnxruntime bundle around any digits-shaped ONNX model


def onnx_variant_bundle(dest: Path, model_bytes: bytes, keys_dir: Path, template: BuiltBundle, *, version: str) -> BuiltBundle:
    """`template`'s manifest and reference stats around `model_bytes`, with a self-test computed from that model."""
    import onnxruntime

    from edgepack.bundle import read_manifest_unverified, write_bundle
    from edgepack.signing import load_private_key

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    members = {"model/model.onnx": model_bytes}
    cases = []
    for index in range(3):
        feed = {"input": VAL_INPUTS[index][None]}
        (logits,) = session.run(["logits"], feed)
        members[f"selftest/{index}/in0.npy"] = _npy(feed["input"])
        members[f"selftest/{index}/out0.npy"] = _npy(logits.astype(np.float32))
        cases.append({"inputs": {"input": f"selftest/{index}/in0.npy"}, "outputs": {"logits": f"selftest/{index}/out0.npy"}})
    members["selftest/cases.json"] = json.dumps({"schema_version": 1, "runtime": "onnxruntime",
                                                 "tolerance": {"atol": 1e-4, "rtol": 1e-3}, "cases": cases}).encode()
    import tarfile

    with tarfile.open(template.path) as tar:
        members["reference/stats.json"] = tar.extractfile("reference/stats.json").read()
    manifest = {k: v for k, v in read_manifest_unverified(template.path).to_json_dict().items() if k not in ("format", "files")}
    manifest["version"] = version
    info = write_bundle(dest, members, manifest, load_private_key(keys_dir / "edgepack.key"))
    digest = hashlib.sha256(info.path.read_bytes()).hexdigest()
    ref = BundleRef(id=digest, name=manifest["name"], version=version, profile=manifest["profile"], sha256=digest,
                    size=info.path.stat().st_size, url=f"/api/v1/bundles/{digest}/download")
    return BuiltBundle(path=info.path, ref=ref, manifest=info.manifest)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
