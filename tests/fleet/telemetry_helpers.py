"""Telemetry for fleet tests: windows with real latency histograms from seeded samples, a database of either
kind with a fleet of two profiles, and a webhook receiver on loopback."""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from edgepack.protocol import Telemetry
from fleet.db import make_engine, make_session_factory
from fleet.models import Base
from fleet.services.status import record_telemetry

# Geometric buckets, 10 % apart from 0.1 ms to ~1.3 s: the shape an agent's latency histogram would have.
BOUNDS_MS = [round(0.1 * 1.1 ** k, 4) for k in range(100)]


def exact_quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latency_samples(seed: str, median_ms: float, n: int, sigma: float = 0.1) -> list[float]:
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    return [median_ms * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def histogram(samples: list[float], bounds: list[float] = BOUNDS_MS) -> list[int]:
    counts = [0] * (len(bounds) + 1)
    for value in samples:
        counts[next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))] += 1
    return counts


def window(device_id: str, bundle_id: str | None, samples: list[float], *, errors: int = 0,
           drift: dict[str, float] | None = None, with_histogram: bool = True,
           bounds: list[float] = BOUNDS_MS, window_s: float = 5.0) -> Telemetry:
    """A telemetry window whose percentiles and histogram come from `samples` (one inference each)."""
    latency: dict[str, Any] = {"p50": exact_quantile(samples, 0.5), "p95": exact_quantile(samples, 0.95),
                               "p99": exact_quantile(samples, 0.99)} if samples else {}
    if with_histogram and samples:
        latency.update(bounds_ms=bounds, counts=histogram(samples, bounds))
    # a window id as the agent gives every window: two windows with the same numbers are still two windows
    return Telemetry(device_id=device_id, window_id=uuid.uuid4().hex, bundle_id=bundle_id, window_s=window_s,
                     inferences=len(samples),
                     errors=errors, latency_ms=latency, drift=drift or {}, drift_method="psi" if drift else None)


def report(session_factory: sessionmaker[Session], telemetry: Telemetry, now: float):
    with session_factory() as session:
        return record_telemetry(session, telemetry, now=now)


def database(db_url: str) -> tuple[sessionmaker[Session], Any]:
    """(session factory, engine) on `db_url` with the tables created (a PostgreSQL test database is shared
    by a module's tests, so tests there name their devices and bundles uniquely)."""
    engine = make_engine(db_url)
    Base.metadata.create_all(engine)
    return make_session_factory(engine), engine


@dataclass
class Webhook:
    """An HTTP server on loopback recording every POST; answers `statuses` in turn, then 204; waits
    `delay_s` before answering (to test timeouts)."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _got: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._got = threading.Condition(self._lock)
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook._got:
                    hook.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                    status = hook.statuses.pop(0) if hook.statuses else 204
                    hook._got.notify_all()
                if hook.delay_s:
                    threading.Event().wait(hook.delay_s)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass  # the test asserts on `requests`; no access log on stderr

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/retrain"

    def wait_for_requests(self, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        with self._got:
            self._got.wait_for(lambda: len(self.requests) >= count, timeout_s)
            return list(self.requests)

    def __enter__(self) -> "Webhook":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
