"""Telemetry windows: what the device served, how fast, how often it failed, and how its data drifted.

    window = TelemetryWindow(bundle_id)
    window.observe(event)                     # every InferenceEvent (an engine observer); O(1), thread-safe
    stats = window.close()                    # the window's counts; the next window starts empty

    publisher = TelemetryPublisher(device_id, link, DiskBuffer(state_dir / "telemetry.buffer", 4 << 20), window_s=10)
    engine.add_observer(publisher.observe)
    agent.on_active_change(publisher.set_active)
    publisher.start() … publisher.stop()

A window counts every request of the active bundle: `inferences` includes the failed ones (the fleet
computes error_rate = errors / inferences), `errors` counts both a caller's bad input and a runtime
failure. Latency goes into a fixed histogram whose bucket upper bounds (`LATENCY_BOUNDS_MS`, 64 of them
log-spaced from 0.05 ms to 10 s, about 21 % apart, plus an overflow bucket) are the same on every
device, so the fleet can add histograms across devices and windows. p50/p95/p99 are interpolated
linearly inside the bucket that holds the rank, with the window's smallest and largest latency
narrowing the first and last buckets (`edgepack.histogram`, the fleet's gates use the same code). Each window also carries the drift of the bundle's inputs and
outputs (`device_agent.drift`, PSI, from up to about 256 requests per window spread over it), the shadow candidate's comparison when shadow mode is on, and
the process's resident memory.

Windows close every `window_s` seconds, and early when the active bundle changes, so no window
mixes two bundles (`window_s` in the message is the window's real length). Requests still finishing
on the old bundle after a switch are left out of the new bundle's window (`ignored_events`). A window
with no bundle and no requests is not sent.

Delivery (`edgepack/v1/devices/{id}/telemetry`, QoS 1, not retained): one publisher thread sends.
While the agent's MQTT connection is up and nothing is waiting, a window goes straight to the client.
While it is down, windows are appended to a `DiskBuffer` in the state folder (fsync'd, size-capped;
the oldest are dropped first); once the connection is back, the buffer is sent oldest first, in
batches, and a window leaves the buffer only when the broker acknowledged it. Windows that close
while the backlog drains queue behind it, so the fleet receives windows in the order they closed.
A message already handed to the MQTT client when the link drops is re-sent by the client after the
reconnect (from memory: a crash before then loses that one window, never a buffered one). The fleet
stores windows by arrival, so a buffered window arrives late with its original `ts`.
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edgepack.clock import SYSTEM_CLOCK, Clock
from edgepack.histogram import LATENCY_BOUNDS_MS, LatencyHistogram
from edgepack.protocol import LatencySummary, Telemetry, encode, telemetry_topic

from device_agent.buffer import DiskBuffer
from device_agent.drift import METHOD as DRIFT_METHOD
from device_agent.drift import DriftMonitor

if TYPE_CHECKING:
    from device_agent.inference import InferenceEvent
    from device_agent.state import ActiveBundle

log = logging.getLogger(__name__)

BUFFER_NAME = "telemetry.buffer"
_DRAIN_BATCH = 32
_ACK_WAIT_S = 5.0
_BACKLOG_POLL_S = 1.0


@dataclass(frozen=True)
class WindowStats:
    """One closed window of one bundle."""

    bundle_id: str | None
    duration_s: float
    inferences: int
    errors: int
    latency_ms: LatencySummary
    ignored_events: int  # requests of another bundle (finishing on the old one after a switch)


class TelemetryWindow:
    """The open window of the active bundle: request and error counts and the latency histogram."""

    def __init__(self, bundle_id: str | None = None, *, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._bounds = bounds
        self._lock = threading.Lock()
        self._bundle_id = bundle_id
        self._reset()

    def _reset(self) -> None:
        self._started = self._clock.monotonic()
        self._errors = 0
        self._ignored = 0
        self._histogram = LatencyHistogram(self._bounds)

    @property
    def bundle_id(self) -> str | None:
        return self._bundle_id

    @property
    def inferences(self) -> int:
        return self._histogram.total

    def observe(self, event: "InferenceEvent") -> None:
        self.record(event.bundle_id, event.latency_ms, event.error is not None)

    def record(self, bundle_id: str | None, latency_ms: float, failed: bool) -> None:
        # On every request's thread: the bucket search runs outside the lock, the histogram update is inlined.
        bucket = bisect.bisect_left(self._bounds, latency_ms)
        with self._lock:
            if bundle_id != self._bundle_id:
                self._ignored += 1
                return
            histogram = self._histogram
            histogram.counts[bucket] += 1
            histogram.total += 1
            if latency_ms < histogram.min:
                histogram.min = latency_ms
            if latency_ms > histogram.max:
                histogram.max = latency_ms
            if failed:
                self._errors += 1

    def close(self, next_bundle_id: Any = ...) -> WindowStats:
        """The window so far; the next one starts now (for `next_bundle_id`, default the same bundle)."""
        with self._lock:
            now = self._clock.monotonic()
            stats = WindowStats(bundle_id=self._bundle_id, duration_s=max(now - self._started, 1e-3),
                                inferences=self._histogram.total, errors=self._errors,
                                latency_ms=self._histogram.summary(), ignored_events=self._ignored)
            if next_bundle_id is not ...:
                self._bundle_id = next_bundle_id
            self._reset()
        return stats


def process_rss_bytes() -> int | None:
    """This process's resident memory: /proc/self/statm, else the peak from getrusage."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


class MessageLink(Protocol):
    """The agent's MQTT connection as the publisher needs it (`device_agent.agent.Agent` is one)."""

    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any: ...


ShadowSummary = Callable[[], "dict[str, float] | None"]


class TelemetryPublisher:
    """Closes a window every `window_s` and sends it; buffers on disk while the broker is unreachable."""

    def __init__(self, device_id: str, link: MessageLink, buffer: DiskBuffer, *, window_s: float = 10.0,
                 shadow_summary: ShadowSummary | None = None, drift_requests_per_window: int = 256,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.device_id = device_id
        self.topic = telemetry_topic(device_id)
        self.link = link
        self.buffer = buffer
        self.window_s = float(window_s)
        self.shadow_summary = shadow_summary
        self.drift_requests_per_window = drift_requests_per_window
        self.clock = clock  # windows, their cadence and their ts; acknowledgement waits are real I/O, on real time
        self.window = TelemetryWindow(clock=clock)
        self._drift: DriftMonitor | None = None
        self._outbox: deque[Telemetry] = deque()
        self._inflight: deque[tuple[int, Any]] = deque()  # (buffer seq, message info) handed to the client, unacknowledged
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._window_lock = threading.Lock()  # closing a window and rotating bundles happen one at a time
        self._thread: threading.Thread | None = None
        self.sent_direct = 0
        self.buffered = 0
        self.sent_from_buffer = 0

    # -- inputs --------------------------------------------------------------------------------------

    def observe(self, event: "InferenceEvent") -> None:
        """An engine observer: count the request; feed drift with the values of answered ones."""
        window = self.window
        window.record(event.bundle_id, event.latency_ms, event.error is not None)
        drift = self._drift
        if drift is not None and event.outputs is not None and event.bundle_id == window._bundle_id:
            drift.observe(event.inputs, event.outputs)

    def set_active(self, active: "ActiveBundle | None") -> None:
        """An active-bundle listener: close the old bundle's window now and start the new bundle's."""
        bundle_id = active.bundle_id if active is not None else None
        if bundle_id == self.window.bundle_id:
            return
        drift = None
        if active is not None:
            drift = DriftMonitor.from_bundle(active.path, active.manifest,
                                             min_interval_s=self.window_s / self.drift_requests_per_window,
                                             clock=self.clock)
        with self._window_lock:
            old_drift, self._drift = self._drift, None
            stats = self.window.close(next_bundle_id=bundle_id)
            self._queue(stats, old_drift)
            self._drift = drift

    # -- windows -------------------------------------------------------------------------------------

    def flush_window(self) -> Telemetry | None:
        """Close the current window now and queue it for sending; the message, or None when there was nothing."""
        with self._window_lock:
            return self._queue(self.window.close(), self._drift)

    def _queue(self, stats: WindowStats, drift: DriftMonitor | None) -> Telemetry | None:
        scores = drift.scores(reset=True) if drift is not None else {}
        shadow = None
        if self.shadow_summary is not None:
            try:
                shadow = self.shadow_summary()
            except Exception:  # shadow statistics must never cost the window itself
                log.exception("shadow summary failed; window sent without it")
        if stats.bundle_id is None and stats.inferences == 0:
            return None
        message = Telemetry(device_id=self.device_id, window_id=uuid.uuid4().hex, bundle_id=stats.bundle_id, window_s=round(stats.duration_s, 3),
                            inferences=stats.inferences, errors=stats.errors, latency_ms=stats.latency_ms, drift=scores,
                            drift_method=DRIFT_METHOD if drift is not None else None, shadow=shadow,
                            rss_bytes=process_rss_bytes(), ts=self.clock.time())
        self._outbox.append(message)
        self._wake.set()
        return message

    # -- the thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0, *, flush: bool = True) -> None:
        """Stop the thread; with `flush`, send (or buffer) the current partial window and whatever is queued."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if flush:
            self.flush_window()
        with self._send_lock:
            self._send_outbox(final=True)

    def _run(self) -> None:
        clock = self.clock
        next_close = clock.monotonic() + self.window_s
        while not self._stop.is_set():
            remaining = next_close - clock.monotonic()
            if remaining <= 0:
                self.flush_window()
                next_close += self.window_s
                if next_close <= clock.monotonic():  # the thread was starved: restart the cadence from now
                    next_close = clock.monotonic() + self.window_s
                continue
            # Idle until the window closes; with a backlog, look for the link coming back every second
            # (of real time: the link coming back is the world's doing, not the clock's).
            if self._inflight or len(self.buffer) > 0:
                self._wake.wait(min(remaining, _BACKLOG_POLL_S))
            else:
                clock.wait(self._wake, remaining)
            self._wake.clear()
            try:
                with self._send_lock:
                    self._send_outbox()
                    self.drain()
            except OSError as exc:  # the disk buffer could not be written: keep serving, say so
                log.error("telemetry buffer %s: %s", self.buffer.path, exc)

    # -- sending -------------------------------------------------------------------------------------

    def _send_outbox(self, final: bool = False) -> None:
        """Send each closed window directly when the link is up and nothing waits, else buffer it."""
        while self._outbox:
            message = self._outbox.popleft()
            payload = encode(message)
            self._settle(0.0)
            if self._inflight or len(self.buffer) or not self.link.is_connected():
                self.buffer.append(payload)
                self.buffered += 1
                continue
            info = self.link.publish(self.topic, payload, qos=1, retain=False)
            if info is None:  # no client at all (stopping): keep it for the next start
                self.buffer.append(payload)
                self.buffered += 1
                continue
            self.sent_direct += 1
            if final and (_delivery(info, 2.0) != "acked" or info.rc):
                # The client's memory dies with the process: keep a copy (a duplicate beats a gap).
                self.buffer.append(payload)
                self.buffered += 1

    def drain(self) -> int:
        """Send buffered windows, oldest first, while the link is up; returns how many were acknowledged now."""
        done = self._settle(0.0)
        while not self._inflight and self.link.is_connected() and len(self.buffer):
            batch = self.buffer.peek(_DRAIN_BATCH)
            for seq, payload in batch:
                info = self.link.publish(self.topic, payload, qos=1, retain=False)
                if info is None:
                    break
                self._inflight.append((seq, info))
            before = len(self._inflight)
            acknowledged = self._settle(_ACK_WAIT_S)
            done += acknowledged
            if acknowledged < before:
                break  # the link dropped mid-batch: the client re-sends the rest after reconnecting
        return done

    def _settle(self, wait_s: float) -> int:
        """Forget buffered windows the broker acknowledged, in order; returns how many."""
        deadline = time.monotonic() + wait_s
        last = None
        count = 0
        while self._inflight:
            seq, info = self._inflight[0]
            state = _delivery(info, max(deadline - time.monotonic(), 0.0))
            if state == "pending":
                break
            self._inflight.popleft()
            if state == "lost":  # the client refused it: it stays buffered and goes again with the next batch
                self._inflight.clear()
                break
            last = seq
            count += 1
        if last is not None:
            self.buffer.remove_through(last)
            self.sent_from_buffer += count
        return count


def _delivery(info: Any, wait_s: float) -> str:
    """"acked" once the broker acknowledged the message (QoS 1 PUBACK), "pending", or "lost".

    A message the client queued without a connection (the link dropped between the check and the
    publish) carries an error code although the client re-sends it after reconnecting: it counts as
    handed over ("acked"). Only a message the client refused to queue at all is "lost".
    """
    try:
        if wait_s > 0:
            info.wait_for_publish(wait_s)
        return "acked" if info.is_published() else "pending"
    except ValueError:
        return "lost"
    except RuntimeError:
        return "acked"
