"""Start a private Mosquitto broker on a free loopback port from a generated config.

Tests and the simulated fleet use their own broker, never the machine's: isolation, and restarts
and ACLs can be tested. `with MosquittoBroker() as broker: broker.url` → "mqtt://127.0.0.1:PORT".
`MosquittoBroker(tls=BrokerTls(cafile, certfile, keyfile))` listens with TLS instead → "mqtts://127.0.0.1:PORT"
(certificates from `edgepack.tls`, e.g. the lab CA; `require_certificate` also asks clients for one).
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BrokerTls:
    """The TLS listener's files: the CA clients' certificates must chain to, the broker's own pair."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False

    def listener_config(self) -> str:
        # Started as root, mosquitto drops to the `mosquitto` user before it reads the key, which is 0600:
        # stay the user that made the key (a no-op when not root).
        from edgepack.tls import mosquitto_tls_config

        return (f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
                + mosquitto_tls_config(self.cafile, self.certfile, self.keyfile, require_certificate=self.require_certificate))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")


class MosquittoBroker:
    def __init__(self, port: int | None = None, extra_config: str = "", tls: BrokerTls | None = None,
                 secure: bool = False) -> None:
        self.port = port or free_port()
        self.extra_config = extra_config
        self.tls = tls
        # secure: the production settings (fleet.broker.config): no anonymous clients, the dynamic security
        # plugin holding the fleet's identity; devices get theirs from the fleet as they enroll.
        self.secure = secure
        self.fleet_password = secrets.token_urlsafe(24) if secure else None
        self.process: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="edgepack-mosquitto-"))

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def fleet_url(self) -> str:
        """The URL the fleet server connects with: its identity in it when the broker is secure."""
        if not self.secure:
            return self.url
        from fleet.broker.rights import FLEET_USERNAME

        return self.url.replace("://", f"://{FLEET_USERNAME}:{self.fleet_password}@", 1)

    def _auth_config(self) -> str:
        if not self.secure:
            return "allow_anonymous true\n"
        from fleet.broker.config import find_dynsec_plugin
        from fleet.broker.dynsec import bootstrap_config

        dynsec = self.dir / "dynamic-security.json"
        if not dynsec.exists():  # a restart keeps the identities the fleet created
            dynsec.write_text(json.dumps(bootstrap_config(self.fleet_password)))
        return f"allow_anonymous false\nplugin {find_dynsec_plugin()}\nplugin_opt_config_file {dynsec}\n"

    def _let_broker_write(self) -> None:
        """Run as root, Mosquitto drops to the `mosquitto` user: give it the folder, where it writes its log
        and the plugin its state."""
        if os.geteuid() != 0:
            return
        try:
            owner = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        for path in (self.dir, *self.dir.iterdir()):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def start(self) -> "MosquittoBroker":
        config = self.dir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (self.tls.listener_config() if self.tls else "")
            + self._auth_config() +
            "persistence false\n"
            "max_packet_size 1048576\n"
            # a fleet server subscribes to every device: let bursts queue instead of dropping QoS 1 messages,
            # and keep what a restarting fleet's persistent session misses until it is back
            "max_queued_messages 100000\n"
            # without it every answer the broker sends (a PUBACK, a dynsec response) waits ~40 ms for the
            # client's delayed ACK (Nagle): a fleet publishing desired states one by one, or enrolling, stalls
            "set_tcp_nodelay true\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            + self.extra_config
        )
        if self.secure:
            self._let_broker_write()
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_listening(10.0)
        except BaseException:
            self.stop()  # a broker that did not come up is not left running
            raise
        return self

    def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.dir / "mosquitto.log"
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start listening within {timeout_s:g} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
