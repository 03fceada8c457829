"""An S3-compatible server for tests and rehearsals, and a TCP proxy that cuts transfers on purpose.

`S3Server` runs s3rver (the npm package pinned in tools/s3rver; `make test` installs it with `npm ci`)
on a free loopback port with one bucket, in a temporary folder deleted afterwards:

    with S3Server() as s3:
        s3.endpoint_url, s3.bucket, s3.access_key, s3.secret_key

s3rver is used because it is the S3-compatible server the registries this project builds from carry
(MinIO, Ceph RGW, Garage and SeaweedFS are in neither Debian bookworm nor PyPI) and, unlike moto's
server, it enforces what the agent's download path depends on: the expiry of presigned URLs ("Request
has expired", 403), the access key id, and Range requests (206 with Content-Range). It does not
recompute SigV4 signatures (its own docs say V4 support is incomplete), so a forged signature is only
refused by a production store (AWS S3, MinIO, Ceph RGW), not here.

`CuttingProxy` forwards TCP to a target and closes the first `cuts` connections after `cut_after` bytes
of the answer: a dropped transfer at a seam we own, in front of a real server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from testbeds.mosquitto import free_port

REPO = Path(__file__).resolve().parent.parent
S3RVER_ENV = "EDGEPACK_S3RVER"
S3RVER_SCRIPT = REPO / "tools" / "s3rver" / "node_modules" / "s3rver" / "bin" / "s3rver.js"
INSTALL_HINT = "install Node.js and run `npm ci --prefix tools/s3rver` (`make test` does)"
# s3rver accepts exactly this key pair and verifies signatures made with it.
ACCESS_KEY = "S3RVER"
SECRET_KEY = "S3RVER"


def find_s3rver() -> tuple[str, Path]:
    """(node, s3rver.js): $EDGEPACK_S3RVER names the script, else the copy tools/s3rver installs."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise FileNotFoundError(f"no node on PATH for the S3-compatible test server: {INSTALL_HINT}")
    script = Path(os.environ.get(S3RVER_ENV) or S3RVER_SCRIPT)
    if not script.is_file():
        raise FileNotFoundError(f"no s3rver at {script}: {INSTALL_HINT}")
    return node, script


class S3Server:
    """A private s3rver with one bucket, on a free loopback port."""

    def __init__(self, bucket: str = "edgepack-bundles", start_timeout_s: float = 30.0) -> None:
        self.node, self.script = find_s3rver()
        self.bucket = bucket
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgepack-s3-"))
        self.process: subprocess.Popen | None = None
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "s3rver.log"

    def env(self) -> dict[str, str]:
        """The variables boto3 reads the credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def start(self) -> "S3Server":
        (self.dir / "data").mkdir()
        command = [self.node, str(self.script), "-d", str(self.dir / "data"), "-a", "127.0.0.1", "-p", str(self.port),
                   "--no-vhost-buckets", "--configure-bucket", self.bucket]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"s3rver exited with {self.process.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    # s3rver opens its port before the bucket exists; its startup line says both are ready.
                    if b"S3rver listening" in self.log_path.read_bytes():
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"s3rver did not listen within {self.start_timeout_s:.0f} s: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-800:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CuttingProxy:
    """A loopback TCP proxy to `target_port`. Once armed, it drops the next `cuts` connections whose
    request starts with `match` (b"GET ", say) after `cut_after` bytes of the server's answer (headers
    included). `requests` holds the head of every request it forwarded; `cut` counts the drops."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_after = 0
        self.cuts_left = 0
        self.match = b""
        self.requests: list[str] = []
        self.cut = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="cutting-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, *, cut_after: int, cuts: int = 1, match: bytes = b"GET ") -> None:
        with self._lock:
            self.cut_after, self.cuts_left, self.match = cut_after, cuts, match

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            first = client.recv(65536)
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self.requests.append(first.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
            cut = self.cuts_left > 0 and first.startswith(self.match)
            if cut:
                self.cuts_left -= 1

        def pump_up() -> None:
            try:
                upstream.sendall(first)
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if cut and sent + len(data) >= self.cut_after:
                    client.sendall(data[: max(self.cut_after - sent, 0)])
                    with self._lock:
                        self.cut += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def __enter__(self) -> "CuttingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._listener.close()


__all__ = ["CuttingProxy", "S3Server", "find_s3rver"]
