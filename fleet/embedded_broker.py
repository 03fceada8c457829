"""An embedded MQTT broker (amqtt) for `edgepack fleet serve` without `--mqtt-url`: a laptop demo
needs nothing installed. Production uses Mosquitto (or any MQTT 3.1.1 broker) by URL."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading

from edgepack.errors import ConfigError

log = logging.getLogger(__name__)


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedBroker":
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._check_port()
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port} within {timeout_s} s")
        if self._error is not None:
            raise self._start_error(self._error)
        deadline = timeout_s
        while deadline > 0:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                deadline -= 0.1
                threading.Event().wait(0.1)
        raise RuntimeError(f"embedded MQTT broker is not accepting connections on {self.host}:{self.port}")

    def _check_port(self) -> None:
        """Bind the port once ourselves (as asyncio will: SO_REUSEADDR) so a taken one is found before amqtt
        logs a traceback about it."""
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise self._start_error(exc) from None

    def _start_error(self, error: BaseException) -> Exception:
        """A taken or forbidden port is the user's to fix: one ConfigError naming it."""
        cause = error
        while not isinstance(cause, OSError) and cause.__cause__ is not None:
            cause = cause.__cause__  # amqtt wraps the listener's OSError in its own exception
        if isinstance(cause, OSError):
            what = "already in use" if cause.errno == errno.EADDRINUSE else f"not available: {cause.strerror or cause}"
            return ConfigError(f"embedded MQTT broker port {self.port} on {self.host} is {what} "
                               "(choose another with --embedded-mqtt-port, or use a broker with --mqtt-url)",
                               host=self.host, port=self.port)
        return RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port}: {error}")

    def _run(self) -> None:
        from amqtt.broker import Broker

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            broker = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })
            try:
                await broker.start()
            except BaseException as exc:  # the port is taken, for instance
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await broker.shutdown()

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def stop(self) -> None:
        if self._loop and self._stop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(timeout=10)
