"""An embedded MQTT broker (amqtt) for `edgepack fleet serve` without `--mqtt-url`: a laptop demo
needs nothing installed. Production uses Mosquitto (or any MQTT 3.1.1 broker) by URL.

Secure by default, with the rules Mosquitto's dynamic security plugin enforces in production
(fleet.broker.rights): no anonymous clients; the fleet logs in as `edgepack-fleet` with the password it
keeps in its data folder; a device logs in as its id with its credential, checked against the credential
hash in the fleet database (`use_fleet_database`), never when revoked; each may publish and subscribe only
where `may_publish`/`may_subscribe` allow (a refused publish is dropped, a refused subscription gets a
failure SUBACK). `close_sessions(username)` disconnects a device whose credential was rotated or revoked.
`secure=False` is the old anonymous broker, for tests that want one.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from edgepack.errors import ConfigError
from fleet.broker.rights import FLEET_USERNAME, may_publish, may_subscribe

log = logging.getLogger(__name__)

# amqtt builds its plugins from dotted paths and dataclass configs: they find their broker here by key.
_BROKERS: dict[str, "EmbeddedBroker"] = {}


def _broker_of(plugin: Any) -> "EmbeddedBroker | None":
    return _BROKERS.get(getattr(plugin.config, "broker_key", ""))


class EdgepackAuthPlugin(BaseAuthPlugin):
    """CONNECT: the fleet's identity or an enrolled, non-revoked device's; nobody else."""

    @dataclass
    class Config:
        broker_key: str = ""

    async def authenticate(self, *, session: Any) -> bool:
        broker = _broker_of(self)
        if broker is None or session is None:
            return False
        password = session.password.decode() if isinstance(session.password, bytes) else session.password
        return await asyncio.to_thread(broker.check_login, session.username, password)


class EdgepackTopicPlugin(BaseTopicPlugin):
    """PUBLISH, SUBSCRIBE and delivery: the topic rights of fleet.broker.rights."""

    @dataclass
    class Config:
        broker_key: str = ""

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        broker = _broker_of(self)
        if broker is None or session is None or not topic:
            return False
        allowed = (may_publish if action == Action.PUBLISH else may_subscribe)(
            session.username, topic, fleet_username=broker.fleet_username)
        if not allowed:
            broker.refused[str(action)] += 1
        return allowed


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, secure: bool = True,
                 fleet_password: str | None = None, fleet_username: str = FLEET_USERNAME) -> None:
        self.host = host
        self.port = port
        self.secure = secure
        self.fleet_username = fleet_username
        self.fleet_password = fleet_password or secrets.token_urlsafe(32)
        # (device id, password) → may it log in; set by use_fleet_database, until then devices are refused
        self.device_login: Callable[[str, str], bool] | None = None
        from collections import Counter

        self.refused: Counter[str] = Counter()  # topic checks refused, by action
        self._key = secrets.token_hex(8)
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def fleet_url(self) -> str:
        """The URL the fleet's bridge connects with (its identity in it when secure)."""
        if not self.secure:
            return self.url
        from urllib.parse import quote

        return f"mqtt://{self.fleet_username}:{quote(self.fleet_password, safe='')}@{self.host}:{self.port}"

    # ------------------------------------------------------------ identities

    def use_fleet_database(self, session_factory: Any) -> None:
        """Check device logins against the credential hashes of the fleet database."""
        from fleet.auth import hash_secret, same_hash
        from fleet.models import Device

        def device_login(device_id: str, password: str) -> bool:
            with session_factory() as session:
                device = session.get(Device, device_id)
                return (device is not None and device.revoked_at is None
                        and same_hash(device.credential_hash, hash_secret(password)))

        self.device_login = device_login

    def check_login(self, username: str | None, password: str | None) -> bool:
        if not username or password is None:
            return False
        if username == self.fleet_username:
            return hmac.compare_digest(password.encode(), self.fleet_password.encode())
        login = self.device_login
        try:
            return bool(login and login(username, password))
        except Exception:  # a database hiccup refuses the login; the client retries
            log.warning("embedded broker: checking %r's login failed", username, exc_info=True)
            return False

    def close_sessions(self, username: str, timeout_s: float = 5.0) -> int:
        """Disconnect every session logged in as `username` (its credential changed); how many."""
        broker, loop = self._broker, self._loop
        if broker is None or loop is None or loop.is_closed():
            return 0

        async def close() -> int:
            # amqtt has no public "kick": _cleanup_session is what its own shutdown uses per client
            doomed = [cid for cid, (session, _) in list(broker._sessions.items()) if session.username == username]
            for client_id in doomed:
                await broker._cleanup_session(client_id)
            return len(doomed)

        return asyncio.run_coroutine_threadsafe(close(), loop).result(timeout_s)

    # DeviceIdentities: the database is the broker's list of identities, so only sessions need closing
    def provision(self, device_id: str, password: str) -> None:
        self.close_sessions(device_id)

    def revoke(self, device_id: str) -> None:
        self.close_sessions(device_id)

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
            if self.secure:
                _BROKERS[self._key] = self
                plugins: dict[str, Any] = {f"{__name__}.EdgepackAuthPlugin": {"broker_key": self._key},
                                           f"{__name__}.EdgepackTopicPlugin": {"broker_key": self._key}}
            else:
                plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
            broker = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": plugins,
            })
            self._broker = broker
            try:
                await broker.start()
            except BaseException as exc:  # the port is taken, for instance
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await broker.shutdown()
            _BROKERS.pop(self._key, None)

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def stop(self) -> None:
        if self._loop and self._stop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(timeout=10)
