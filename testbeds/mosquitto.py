"""Start a private Mosquitto broker on a free loopback port from a generated config.

Tests and the simulated fleet use their own broker, never the machine's: isolation, and restarts
and ACLs can be tested. `with MosquittoBroker() as broker: broker.url` → "mqtt://127.0.0.1:PORT".
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


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
    def __init__(self, port: int | None = None, extra_config: str = "") -> None:
        self.port = port or free_port()
        self.extra_config = extra_config
        self.process: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="edgepack-mosquitto-"))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "MosquittoBroker":
        config = self.dir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_packet_size 1048576\n"
            # a fleet server subscribes to every device: let bursts queue instead of dropping QoS 1 messages,
            # and keep what a restarting fleet's persistent session misses until it is back
            "max_queued_messages 100000\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            + self.extra_config
        )
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
