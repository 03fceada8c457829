"""Device status and telemetry on their way from the MQTT thread to the database, in batches.

    paho network thread ──decode, check──▶ bounded queue ──▶ writer thread(s) ──▶ one transaction per batch
                                                                             └─▶ PUBACK of each message

The MQTT thread only parses the topic, charges the device's message budget, decodes and checks the payload
(fleet.mqtt_bridge) and puts the message on its device's writer queue (a device always on the same writer,
so its messages are applied in the order they arrived). Writers take what is queued — up to `batch` messages,
waiting at most `linger_s` for more once they hold one — and store it with fleet.services.status.store_batch:
statuses in arrival order, telemetry in one multi-row INSERT … ON CONFLICT DO NOTHING, one commit. Only then
is each message acknowledged to the broker (paho's manual acks), so a crash between receipt and commit loses
nothing: the broker redelivers what was not acknowledged, and the window key makes the redelivery a no-op.

Backpressure, not loss: a full queue blocks the MQTT thread in `submit` (then the broker holds the messages
in the session, up to its own limits — see docs/ARCHITECTURE.md "Running at scale"). A message is only ever
dropped with a reason that is counted (`dropped[reason]`, `edgepack_ingest_dropped_total{reason}`) and
logged: `unknown_device` and `revoked_device` (decided in the batch, where the device rows are read once),
and `stopped` (submitted while the server shuts down; left unacknowledged, so the broker redelivers it to the
next server). A database error rolls the batch back and retries it with backoff, the messages still
unacknowledged; a message that fails on its own (not the database) is stored in a batch of one, and counted
in `failed` if even that fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections import Counter
from typing import Callable, Sequence

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fleet.models import Alert
from fleet.services.alerts import DriftAlertPolicy, check_drift, needs_drift_check, open_drift_subjects
from fleet.services.status import BatchOutcome, Inbound, store_batch

log = logging.getLogger(__name__)

_STOP = object()


class Ingestor:
    """A bounded queue of decoded device messages and the writer threads that store them in batches."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        max_queue: int = 20_000,
        batch: int = 500,
        writers: int = 1,
        linger_s: float = 0.02,
        drift_policy: DriftAlertPolicy | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        on_stored: Callable[[Inbound, str], None] | None = None,
        retry_s: float = 0.5,
    ) -> None:
        self.session_factory = session_factory
        self.batch = batch
        self.writers = writers
        self.linger_s = linger_s
        self.drift_policy = drift_policy
        self.on_alert = on_alert
        self.on_stored = on_stored  # hears every message's outcome (the bridge's counters)
        self.retry_s = retry_s
        # One queue per writer, a device always on the same one: a device's messages are stored in the order
        # they arrived even while a batch is retried, and no two writers ever lock the same device row.
        self._queues: list[queue.Queue[object]] = [queue.Queue(maxsize=max(1, max_queue // writers))
                                                   for _ in range(writers)]
        self._threads: list[threading.Thread] = []
        self._running = False
        self._lock = threading.Lock()
        self.stored: Counter[str] = Counter()  # outcome → messages
        self.dropped: Counter[str] = Counter()
        self.failed = 0
        self.batches = 0
        self.waits = 0  # submits that found the queue full and waited

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Ingestor":
        with self._lock:
            if self._running:
                return self
            self._running = True
            self._threads = [threading.Thread(target=self._run, args=(q,), name=f"ingest-{i}", daemon=True)
                             for i, q in enumerate(self._queues)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Store what is queued, then stop the writers."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            threads, self._threads = self._threads, []
        for q in self._queues:
            q.put(_STOP)  # after everything queued before it
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def depth(self) -> int:
        """Messages queued and not yet stored."""
        return sum(q.unfinished_tasks for q in self._queues)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is stored (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.depth == 0:
                return True
            time.sleep(0.005)
        return False

    # ------------------------------------------------------------ the MQTT thread's side

    def submit(self, item: Inbound) -> bool:
        """Queue one message for a writer; blocks while the queue is full (backpressure on the broker).
        False when the ingestor is stopped (the message is counted, logged and left unacknowledged)."""
        if not self._running:
            self._drop("stopped", item)
            return False
        shard = self._queues[zlib.crc32(item.message.device_id.encode()) % len(self._queues)]
        try:
            shard.put_nowait(item)
        except queue.Full:
            self.waits += 1
            _count("INGEST_WAITS")
            while True:
                try:
                    shard.put(item, timeout=1.0)
                    break
                except queue.Full:
                    if not self._running:
                        self._drop("stopped", item)
                        return False
        return True

    # ------------------------------------------------------------ writers

    def _run(self, source: queue.Queue[object]) -> None:
        while True:
            first = source.get()
            if first is _STOP:
                source.task_done()
                return
            items: list[Inbound] = [first]  # type: ignore[list-item]
            stop_seen = False
            deadline = time.monotonic() + self.linger_s
            while len(items) < self.batch:
                try:
                    remaining = deadline - time.monotonic()
                    nxt = source.get_nowait() if remaining <= 0 else source.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop_seen = True
                    break
                items.append(nxt)  # type: ignore[arg-type]
            try:
                self._store(items)
            finally:
                for _ in range(len(items) + stop_seen):
                    source.task_done()
            if stop_seen:
                return

    def _store(self, items: Sequence[Inbound]) -> None:
        delay = self.retry_s
        while True:
            try:
                outcome = self._store_once(items)
                break
            except OperationalError as exc:  # the database is away: keep the batch, try again
                log.warning("ingest: storing %d messages failed (%s); retrying in %.1f s", len(items),
                            str(exc).splitlines()[0][:200], delay)
                _count("INGEST_RETRIES")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                if not self._running and delay >= 10.0:
                    log.error("ingest: giving up on %d messages at shutdown; the broker will redeliver them", len(items))
                    return
            except Exception:
                if len(items) == 1:
                    self.failed += 1
                    _count("INGEST_FAILED")
                    log.exception("ingest: a %s message of device %s cannot be stored", items[0].kind,
                                  items[0].message.device_id)
                    _ack(items[0])  # it would fail again on every redelivery
                    return
                log.exception("ingest: a batch of %d failed; storing its messages one by one", len(items))
                for item in items:
                    self._store([item])
                return
        self.batches += 1
        _count("INGEST_BATCHES")
        for item, result in zip(items, outcome.outcomes):
            if result.startswith("dropped:"):  # logged by on_stored (the bridge, rate-limited per reason)
                self._drop(result.split(":", 1)[1], item, quiet=self.on_stored is not None)
            else:
                self.stored[result] += 1
                if result == "duplicate":
                    _count("INGEST_DUPLICATES")
            _ack(item)
            if self.on_stored is not None:
                self.on_stored(item, result)

    def _store_once(self, items: Sequence[Inbound]) -> BatchOutcome:
        return store_messages(self.session_factory, items, self.drift_policy, self.on_alert)

    def _drop(self, reason: str, item: Inbound, *, quiet: bool = False) -> None:
        self.dropped[reason] += 1
        _count("INGEST_DROPPED", reason=reason)
        if not quiet:
                log.warning("ingest: dropped a %s message of device %s: %s", item.kind, item.message.device_id, reason)


def store_messages(session_factory: sessionmaker[Session], items: Sequence[Inbound],
                   drift_policy: DriftAlertPolicy | None = None,
                   on_alert: Callable[[Alert], None] | None = None) -> BatchOutcome:
    """Store a batch (one transaction), then run the drift check of the windows that need one (each check
    that raises or clears an alert commits on its own); `on_alert` hears of every new alert."""
    with session_factory() as session:
        outcome = store_batch(session, items)
        if drift_policy is not None and outcome.windows:
            open_subjects = open_drift_subjects(session, {window.device_id for window in outcome.windows})
            for window in outcome.windows:
                if not needs_drift_check(window, drift_policy, open_subjects):
                    continue
                alert = check_drift(session, window, drift_policy)
                if alert is not None and on_alert is not None:
                    on_alert(alert)
        return outcome


def _ack(item: Inbound) -> None:
    if item.ack is not None:
        try:
            item.ack()
        except Exception:  # a lost connection: the broker redelivers, the window key dedupes
            log.debug("ingest: PUBACK failed", exc_info=True)


def _count(name: str, **labels: str) -> None:
    from fleet.controller import count_metric

    count_metric(name, **labels)


__all__ = ["Ingestor", "store_messages"]
