"""Telemetry: histogram percentiles, windows, the disk buffer, and delivery over a real Mosquitto through an outage."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from device_agent.buffer import DiskBuffer
from device_agent.inference import InferenceEvent
from device_agent.telemetry import LATENCY_BOUNDS_MS, LatencyHistogram, TelemetryWindow, process_rss_bytes
from edgepack.clock import FakeClock
from edgepack.protocol import Telemetry, decode
from tests.device_agent.agent_harness import agents, install, samples, wait_until  # noqa: F401 - agents is a fixture

BUCKET_RATIO = LATENCY_BOUNDS_MS[1] / LATENCY_BOUNDS_MS[0]


def event(bundle_id: str, latency_ms: float, error: str | None = None) -> InferenceEvent:
    return InferenceEvent(bundle_id, {}, None if error else {}, latency_ms, error, time.time())


# -- the histogram and the window -------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["lognormal", "uniform", "bimodal"])
def test_histogram_percentiles_agree_with_numpy_within_a_fraction_of_a_bucket(distribution):
    rng = np.random.default_rng(7)
    values = {
        "lognormal": rng.lognormal(mean=1.0, sigma=0.8, size=20_000),
        "uniform": rng.uniform(2.0, 40.0, size=20_000),
        "bimodal": np.concatenate([rng.normal(3.0, 0.3, 15_000), rng.normal(120.0, 10.0, 5_000)]).clip(0.01),
    }[distribution]
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(float(value))

    for q in (0.5, 0.95, 0.99):
        exact = float(np.percentile(values, q * 100))
        estimate = histogram.percentile(q)
        # Linear interpolation inside a ~21 % wide bucket: well under half a bucket on smooth data.
        assert abs(estimate - exact) / exact < (BUCKET_RATIO - 1) / 2, (q, estimate, exact)
    assert sum(histogram.counts) == len(values) and len(histogram.counts) == len(LATENCY_BOUNDS_MS) + 1


def test_histogram_edges_one_value_and_overflow():
    histogram = LatencyHistogram()
    assert histogram.percentile(0.5) is None
    histogram.add(3.0)
    assert histogram.percentile(0.5) == histogram.percentile(0.99) == 3.0  # min and max narrow the bucket
    histogram.add(50_000.0)  # past the last bound: the overflow bucket, bounded by the largest value seen
    assert histogram.counts[-1] == 1 and histogram.percentile(1.0) == 50_000.0
    assert LATENCY_BOUNDS_MS[0] == 0.05 and LATENCY_BOUNDS_MS[-1] == 10_000.0
    assert all(b > a for a, b in zip(LATENCY_BOUNDS_MS, LATENCY_BOUNDS_MS[1:]))


def test_a_window_counts_failed_requests_as_inferences_and_leaves_other_bundles_out():
    window = TelemetryWindow("new")
    for latency in (1.0, 2.0, 3.0):
        window.observe(event("new", latency))
    window.observe(event("new", 4.0, error="runtime failed"))
    window.observe(event("old", 9.0))  # a request that finished on the old bundle after the switch

    stats = window.close()
    again = window.close()

    assert (stats.bundle_id, stats.inferences, stats.errors, stats.ignored_events) == ("new", 4, 1, 1)
    assert sum(stats.latency_ms.counts) == 4 and stats.latency_ms.p50 == pytest.approx(2.0, rel=0.25)
    assert (again.inferences, again.errors, again.latency_ms.p50) == (0, 0, None)


def test_a_window_is_thread_safe():
    window = TelemetryWindow("b")

    def hammer() -> None:
        for i in range(5000):
            window.observe(event("b", 1.0 + i % 7, error="x" if i % 10 == 0 else None))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = window.close()
    assert (stats.inferences, stats.errors, sum(stats.latency_ms.counts)) == (40_000, 4000, 40_000)


def test_the_process_rss_is_read():
    rss = process_rss_bytes()
    assert rss is not None and 10 << 20 < rss < 64 << 30


# -- the disk buffer ----------------------------------------------------------------------------------


def test_the_disk_buffer_keeps_order_across_reopen_and_removes_only_what_was_delivered(tmp_path):
    path = tmp_path / "telemetry.buffer"
    buffer = DiskBuffer(path, max_bytes=1 << 20)
    seqs = [buffer.append(json.dumps({"n": n}).encode()) for n in range(5)]

    reopened = DiskBuffer(path, max_bytes=1 << 20)
    assert [json.loads(p)["n"] for _, p in reopened.peek(10)] == [0, 1, 2, 3, 4]
    assert reopened.remove_through(seqs[1]) == 2
    assert reopened.append(b'{"n":5}') > seqs[-1]  # seqs keep increasing after a reopen

    assert [json.loads(p)["n"] for _, p in DiskBuffer(path, max_bytes=1 << 20).peek(10)] == [2, 3, 4, 5]


def test_the_disk_buffer_drops_the_oldest_past_its_cap_and_counts_them(tmp_path):
    buffer = DiskBuffer(tmp_path / "b", max_bytes=4096)
    payload = b'{"pad":"' + b"x" * 180 + b'"}'
    for n in range(100):
        buffer.append(payload.replace(b"x", str(n % 10).encode(), 1))

    assert buffer.size_bytes <= 4096 and (tmp_path / "b").stat().st_size == buffer.size_bytes
    assert buffer.dropped + len(buffer) == 100 and buffer.dropped > 0
    seqs = [seq for seq, _ in buffer.peek(100)]
    assert seqs == list(range(101 - len(seqs), 101))  # the newest survive, in order
    with pytest.raises(ValueError):
        buffer.append(b'{"pad":"' + b"y" * 5000 + b'"}')


def test_a_torn_last_line_from_a_crash_is_dropped_when_the_buffer_opens(tmp_path):
    path = tmp_path / "b"
    buffer = DiskBuffer(path, max_bytes=1 << 20)
    buffer.append(b'{"n":1}')
    buffer.append(b'{"n":2}')
    with open(path, "ab") as handle:
        handle.write(b'{"seq":3,"payload":{"n"')  # the process died mid-append

    reopened = DiskBuffer(path, max_bytes=1 << 20)
    reopened.append(b'{"n":4}')

    assert reopened.torn == 1
    assert [json.loads(p)["n"] for _, p in DiskBuffer(path, max_bytes=1 << 20).peek(10)] == [1, 2, 4]


# -- over a real broker ---------------------------------------------------------------------------


def test_windows_are_published_and_decode_as_protocol_telemetry(agents, mosquitto, bundles):
    clock = FakeClock()
    agent, statuses, telemetry = agents(telemetry={"window_s": 0.5}, clock=clock)
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    spacing = 1.05 * 0.5 / 256  # drift bins at most one request per window_s / 256: space them out
    for request in samples(40):
        agent.infer(request)
        clock.advance(spacing)
    with pytest.raises(Exception):
        agent.infer({"input": np.zeros((1, 2, 3), np.float32)})  # a bad request counts as an inference and an error

    clock.wait_for_waiters(1)  # the publisher is idle until its first window closes...
    clock.advance(0.5)  # ...which it does now, on its own thread
    wait_until(lambda: sum(m.inferences for m in telemetry.messages) >= 41, timeout=5)
    [message] = [m for m in telemetry.messages if m.inferences]  # no time passed between the requests but the clock's

    assert isinstance(message, Telemetry) and message.device_id == agent.device_id
    assert message.bundle_id == bundles.onnx.ref.id and (message.inferences, message.errors) == (41, 1)
    assert message.latency_ms.bounds_ms == list(LATENCY_BOUNDS_MS) and sum(message.latency_ms.counts) == message.inferences
    assert 0 < message.latency_ms.p50 <= message.latency_ms.p95 <= message.latency_ms.p99
    assert message.drift_method == "psi" and set(message.drift) == {"input", "logits"}
    # The window ran from the switch to the bundle until the clock passed the first close.
    assert message.window_s == pytest.approx(40 * spacing + 0.5, abs=1e-3) and message.ts == clock.time()
    assert message.rss_bytes > 0 and message.shadow is None
    assert decode(Telemetry, message.model_dump_json()) == message


def test_windows_closed_while_the_broker_is_down_are_buffered_on_disk_and_delivered_in_order(agents, mosquitto, bundles):
    clock = FakeClock()
    agent, statuses, telemetry = agents(telemetry={"window_s": 0.3}, clock=clock)
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    telemetry.close()
    statuses.close()

    mosquitto.stop()
    wait_until(lambda: not agent.is_connected(), timeout=10)
    # Each window gets a different number of requests, so the order they arrive in is visible.
    for count in range(1, 6):
        window_closed = len(agent.telemetry.buffer)
        for request in samples(count):
            agent.infer(request)
        clock.advance(0.3)  # the window closes on the publisher's thread, and goes to the disk buffer
        wait_until(lambda: len(agent.telemetry.buffer) > window_closed, timeout=5)
    buffer_path = agent.telemetry.buffer.path
    on_disk = [json.loads(line)["payload"] for line in buffer_path.read_bytes().splitlines()]
    assert [w["inferences"] for w in on_disk if w["inferences"]] == [1, 2, 3, 4, 5]

    # Restart the broker right after one of the agent's reconnect attempts: its backoff gives the
    # subscriber a second or more to subscribe before the agent is back.
    _wait_for_a_connection_attempt(mosquitto.port)
    mosquitto.start()
    from tests.device_agent.agent_harness import TelemetryWatcher

    watcher = TelemetryWatcher(mosquitto.url, agent.device_id)
    assert not agent.is_connected(), "the agent reconnected before the subscriber: test timing broke"
    try:
        wait_until(lambda: sum(m.inferences for m in watcher.messages) >= 15, timeout=45)
        wait_until(lambda: len(agent.telemetry.buffer) == 0, timeout=10)
        delivered = [m.inferences for m in watcher.messages if m.inferences]
        assert delivered[:5] == [1, 2, 3, 4, 5]
        stamps = [m.ts for m in watcher.messages]
        assert stamps == sorted(stamps)  # buffered windows first, oldest first, then the live ones
        assert not buffer_path.exists()
    finally:
        watcher.close()


def _wait_for_a_connection_attempt(port: int, timeout: float = 40.0) -> None:
    """Listen on the broker's port until the agent tries to connect, then refuse it (close)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        listener.settimeout(timeout)
        connection, _ = listener.accept()
        connection.close()
