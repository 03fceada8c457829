"""A real fleet on one machine, for end-to-end tests and benchmarks.

    with MosquittoBroker(secure=True) as broker, FleetProcess.for_broker(broker, tmp, trusted_key=pub) as fleet:
        bundles = build_release(tmp, key, "2.0.0", ["jetson-orin-nano", "x86-avx2"])
        agents = agent_configs(tmp, 20, [...], fleet.url, broker.url, token, pub)

The secure path is what production runs: Mosquitto with the dynamic security plugin (`secure=True`), the
fleet logged in as its own identity and creating each device's as it enrolls (`for_broker` passes
`broker.fleet_url` and --mqtt-dynsec), agents logging in with their credential; `lab_pki(root)` adds TLS
(a lab CA, certificates for the broker and the fleet).

The fleet server runs as a real `edgepack fleet serve` process (so it can be killed and restarted), the
agents are real `device_agent.Agent`s with their own MQTT connections, state folders and downloads,
sharing this process (self-tests in threads).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from testbeds.mosquitto import BrokerTls, MosquittoBroker, free_port

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits" / "edgepack.yaml"
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"


class FleetProcess:
    """`edgepack fleet serve` as a child process on a free port."""

    def __init__(self, root: Path, mqtt_url: str, *, trusted_key: Path, db_url: str | None = None,
                 admin_token: str = ADMIN_TOKEN, extra_args: list[str] | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.root = root
        # (certificate, key, CA): serve the API over HTTPS (--tls-cert/--tls-key); the CA verifies it here.
        self.tls = tls
        self.extra_args = list(extra_args or [])
        self.mqtt_url = mqtt_url
        self.trusted_key = trusted_key
        self.db_url = db_url
        self.admin_token = admin_token
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = root / "fleet.log"

    @classmethod
    def for_broker(cls, broker: MosquittoBroker, root: Path, *, trusted_key: Path, extra_args: list[str] | None = None,
                   **kwargs: Any) -> "FleetProcess":
        """The fleet as it runs against this broker in production: its own identity (broker.fleet_url), managing
        device identities when the broker is secure (--mqtt-dynsec), verifying a TLS broker against its CA."""
        args = (["--mqtt-dynsec"] if broker.secure else []) + (["--mqtt-ca", str(broker.tls.cafile)] if broker.tls else [])
        return cls(root, broker.fleet_url, trusted_key=trusted_key, extra_args=args + list(extra_args or []), **kwargs)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> Any:
        """What an HTTP client here verifies the fleet with: its CA over HTTPS (httpx's `verify=`)."""
        import ssl

        return ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else True

    def start(self, timeout_s: float = 60.0) -> "FleetProcess":
        command = [sys.executable, "-m", "edgepack", "fleet", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--data-dir", str(self.root / "fleet-data"), "--mqtt-url", self.mqtt_url,
                   "--trusted-key", str(self.trusted_key), "--public-url", self.url]
        if self.db_url:
            command += ["--db-url", self.db_url]
        if self.tls:
            command += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        command += self.extra_args
        env = {**os.environ, "EDGEPACK_ADMIN_TOKEN": self.admin_token}
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.kill()  # a fleet that did not come up is not left running
            raise
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        verify = self.verify
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fleet exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"fleet did not become healthy in {timeout_s} s: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self):
        from fleet.client import FleetClient

        return FleetClient(self.url, self.admin_token, verify=self.verify)

    def __enter__(self) -> "FleetProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclasses.dataclass(frozen=True)
class LabPki:
    """A lab CA and certificates for 127.0.0.1/localhost: the broker's TLS listener and the fleet's HTTPS."""

    ca: Path
    broker: BrokerTls
    fleet: tuple[Path, Path, Path]  # (certificate, key, CA), as FleetProcess(tls=...) takes it


def lab_pki(root: Path) -> LabPki:
    from edgepack.tls import create_lab_ca, issue_certificate

    folder = root / "pki"
    if not (folder / "ca.pem").exists():
        create_lab_ca(folder)
        issue_certificate(folder, "broker")
        issue_certificate(folder, "fleet")
    ca = folder / "ca.pem"
    return LabPki(ca, BrokerTls(ca, folder / "broker.pem", folder / "broker.key"),
                  (folder / "fleet.pem", folder / "fleet.key", ca))


def build_release(root: Path, key: Path, version: str, profiles: list[str], *, break_selftest: bool = False,
                  cache_dir: Path | None = None) -> list[Path]:
    """digits built as `version` for each profile; `break_selftest` makes bundles whose self-test fails on a device."""
    from builder.pipeline import BuildRequest, run_build

    config = yaml.safe_load(DIGITS.read_text())
    base = DIGITS.parent
    config.update(version=version, model=str(base / config["model"]),
                  data={name: str(base / value) for name, value in config["data"].items()})
    project = root / f"project-{version}"
    project.mkdir(parents=True, exist_ok=True)
    (project / "edgepack.yaml").write_text(yaml.safe_dump(config))
    paths = []
    for profile in profiles:
        result = run_build(BuildRequest(config_path=project / "edgepack.yaml", profile=profile, out_dir=root / "dist",
                                        signing_key=key, cache_dir=cache_dir or root / "cache"))
        path = Path(result.report.bundle.path)
        if break_selftest:
            path = _with_wrong_selftest(path, key)
        paths.append(path)
    return paths


def _with_wrong_selftest(source: Path, key: Path) -> Path:
    """The same bundle, re-signed, with self-test expectations the model cannot meet."""
    from edgepack.bundle import read_manifest_unverified, write_bundle
    from edgepack.signing import load_private_key

    manifest = read_manifest_unverified(source)
    members: dict[str, bytes] = {}
    with tarfile.open(source) as tar:
        for name in manifest.files:
            data = tar.extractfile(name).read()
            if name.startswith("selftest/") and "/out" in name:
                array = np.load(io.BytesIO(data))
                buffer = io.BytesIO()
                np.save(buffer, (array + 100.0).astype(array.dtype), allow_pickle=False)
                data = buffer.getvalue()
            members[name] = data
    dest = source.with_name(source.stem + "-broken.edgepack")
    write_bundle(dest, members, manifest.content, load_private_key(key))
    return dest


@dataclasses.dataclass
class SimAgent:
    device_id: str
    profile: str
    config: Any
    agent: Any = None

    def start(self) -> None:
        from device_agent.agent import Agent

        self.agent = Agent(self.config)
        threading.Thread(target=self.agent.start, name=f"start-{self.device_id}", daemon=True).start()

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop(timeout=5)
            self.agent = None

    def active_version(self) -> str | None:
        if self.agent is None:
            return None
        status = self.agent.status()
        return status.current_bundle if status else None


def agent_configs(root: Path, count: int, profiles: list[str], fleet_url: str, mqtt_url: str, enrollment_token: str,
                  trusted_key: Path, labels: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                  start: int = 0) -> list[SimAgent]:
    from device_agent.config import AgentConfig

    agents = []
    for index in range(start, start + count):
        profile = profiles[index % len(profiles)]
        device_id = f"dev-{index:03d}"
        config = AgentConfig.from_mapping({
            "device_id": device_id, "profile": profile, "fleet_url": fleet_url, "mqtt_url": mqtt_url,
            "enrollment_token": enrollment_token, "state_dir": str(root / "agents" / device_id),
            "trusted_keys": [str(trusted_key)], "labels": {"site": "lab", **(labels or {})},
            "download": {"backoff_s": 0.2, "retry_interval_s": 0.5}, "selftest_isolation": "thread",
            "selftest_timeout_s": 60, **(extra or {}),
        })
        agents.append(SimAgent(device_id, profile, config))
    return agents


class TopicListener:
    """A plain MQTT client of its own that subscribes to one topic filter; subclasses handle `_on_message`.

    Subclasses set up the state `_on_message` touches before calling `super().__init__`: messages can
    arrive as soon as it returns.
    """

    def __init__(self, mqtt_url: str, topic: str, *, qos: int = 0, name: str = "listener",
                 ca_file: Path | None = None) -> None:
        """`mqtt_url` carries the identity to log in with on a secure broker (e.g. `broker.fleet_url`)."""
        import paho.mqtt.client as mqtt

        from edgepack.mqtt import MqttEndpoint

        endpoint = MqttEndpoint.from_url(mqtt_url, ca_file=ca_file)
        self.subscribed = threading.Event()  # set once the broker granted the subscription
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}-{time.time_ns()}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=qos)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        endpoint.apply(self.client)
        self.client.connect(endpoint.host, endpoint.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class DesiredMonitor(TopicListener):
    """Records every desired state the broker delivers, to check that no device got conflicting ones."""

    def __init__(self, mqtt_url: str, ca_file: Path | None = None) -> None:
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        super().__init__(mqtt_url, "edgepack/v1/devices/+/desired", qos=1, name="monitor", ca_file=ca_file)

    def _on_message(self, client, userdata, message) -> None:
        if not message.payload:
            return
        device_id = message.topic.split("/")[3]
        with self._lock:
            self.messages.append((device_id, json.loads(message.payload)))

    def per_device(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        with self._lock:
            for device_id, payload in self.messages:
                out.setdefault(device_id, []).append(payload)
        return out


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")
