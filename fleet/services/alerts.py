"""Alerts: a device's model drifting outside any rollout, raised once, cleared when it passes, and POSTed
to a webhook (the "retrain" trigger).

    check_drift(session, window, policy)   after each stored telemetry window (the MQTT bridge calls it)
        worst = the window's highest drift score over the model's inputs and outputs
        worst > threshold, the device is in no active rollout, and no open drift alert for the bundle (one
        retrain call per model: other devices seeing the same drift join that alert's `devices`)
            was raised within `repeat_s`                  → a new Alert(kind="drift"), audited and counted
        worst ≤ CLEAR_FRACTION × threshold                → the open drift alerts of (device, bundle) clear
        in between, or no drift scores in the window      → nothing changes (hysteresis: a score hovering
                                                            around the threshold raises one alert, not one
                                                            per crossing)

    AlertDispatcher                        a background thread POSTs every undelivered alert to the webhook

A device that is a member of an active rollout (pending, running, paused, rolling back) raises no drift
alert: its model is being changed, and the rollout's own `drift` gate judges it. An alert stays open
until its device reports drift back under CLEAR_FRACTION × threshold; after `repeat_s` an alert that is
still open is raised again (a reminder, delivered like the first).

Delivery. The dispatcher claims an alert with a conditional UPDATE (attempts + 1, so two servers never
post the same attempt twice), POSTs `alert_payload(alert)` as JSON with a timeout and an
`X-Edgepack-Alert-Id` header (a receiver can drop repeats by it), and records the outcome: any 2xx marks
it delivered; anything else (status, timeout, refused connection) is kept in `last_error` and retried
after an exponential backoff, at most `max_attempts` times. Undelivered alerts survive a restart and go
out when the server is back; `notify()` wakes the thread when the bridge raised one.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from edgepack.errors import ConfigError
from edgepack.retry import RetryPolicy
from fleet.models import Alert, Bundle, Device, Rollout, RolloutMember, TelemetryWindow, utcnow
from fleet.services import audit
from fleet.services.gates import utc
from fleet.services.rollouts import ACTIVE_STATUSES

if TYPE_CHECKING:  # for the type hints only
    from fleet.services.status import StoredWindow

log = logging.getLogger(__name__)

DRIFT = "drift"
ACTOR = "telemetry"
# An open drift alert clears when the device's worst score falls to this share of the threshold or below.
CLEAR_FRACTION = 0.8
DEFAULT_DRIFT_THRESHOLD = 0.25  # PSI above 0.25: a significant population shift, by the usual rule of thumb
DEFAULT_REPEAT_S = 3600.0


def _count(name: str, **labels: str) -> None:
    from fleet.controller import count_metric  # the metrics registry lives on the API side

    count_metric(name, **labels)


@dataclass(frozen=True)
class DriftAlertPolicy:
    """When a drift score raises an alert: above `threshold`, at most once per `repeat_s` while open."""

    threshold: float = DEFAULT_DRIFT_THRESHOLD
    repeat_s: float = DEFAULT_REPEAT_S

    def __post_init__(self) -> None:
        for name in ("threshold", "repeat_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ConfigError(f"drift alert {name} {value!r}: expected a positive number")


def in_active_rollout(session: Session, device_id: str) -> bool:
    return session.scalars(
        select(RolloutMember.id).join(Rollout, Rollout.id == RolloutMember.rollout_id)
        .where(RolloutMember.device_id == device_id, Rollout.status.in_(ACTIVE_STATUSES)).limit(1)
    ).first() is not None


def _same_subject(device_id: str, bundle_id: str | None, kind: str):
    bundle = Alert.bundle_id.is_(None) if bundle_id is None else Alert.bundle_id == bundle_id
    return (Alert.device_id == device_id, bundle, Alert.kind == kind)


def needs_drift_check(window: TelemetryWindow | StoredWindow, policy: DriftAlertPolicy, open_subjects: set[tuple[str, str | None]]) -> bool:
    """Whether check_drift could change anything for this window: its worst score is above the threshold,
    or it is low enough to clear an alert that is open (`open_subjects`, from open_drift_subjects). The
    writers call check_drift only for these, so a batch of healthy windows costs one query, not one each."""
    scores = [float(score) for score in (window.drift or {}).values()
              if isinstance(score, (int, float)) and math.isfinite(score)]
    if not scores:
        return False
    worst = max(scores)
    if worst > policy.threshold:
        return True
    return worst <= policy.threshold * CLEAR_FRACTION and (window.device_id, window.bundle_id) in open_subjects


def open_drift_subjects(session: Session, device_ids: set[str]) -> set[tuple[str, str | None]]:
    """(device_id, bundle_id) of the open drift alerts of these devices, in one query."""
    if not device_ids:
        return set()
    rows = session.execute(select(Alert.device_id, Alert.bundle_id).where(
        Alert.kind == DRIFT, Alert.cleared_at.is_(None), Alert.device_id.in_(device_ids)))
    return {tuple(row) for row in rows}


def check_drift(session: Session, window: TelemetryWindow | StoredWindow, policy: DriftAlertPolicy,
                now: float | dt.datetime | None = None) -> Alert | None:
    """Raise, keep or clear the drift alert of the window's device and bundle (see the module docstring);
    returns a newly raised alert (committed), else None. `now` defaults to when the window was received."""
    scores = {str(name): float(score) for name, score in (window.drift or {}).items()
              if isinstance(score, (int, float)) and math.isfinite(score)}
    if not scores:
        return None
    at = utc(now) if now is not None else utc(window.received_at) or utcnow()
    worst = max(scores, key=scores.__getitem__)
    score = scores[worst]
    subject = _same_subject(window.device_id, window.bundle_id, DRIFT)
    if score <= policy.threshold * CLEAR_FRACTION:
        # Most windows land here: read first, so a healthy device's telemetry never takes a write lock.
        open_ids = session.scalars(select(Alert.id).where(*subject, Alert.cleared_at.is_(None))).all()
        if open_ids:
            session.execute(update(Alert).where(Alert.id.in_(open_ids)).values(cleared_at=at)
                            .execution_options(synchronize_session=False))
            session.commit()
            log.info("device %s: drift back to %.3g; %d drift alert(s) cleared", window.device_id, score, len(open_ids))
        return None
    if score <= policy.threshold or in_active_rollout(session, window.device_id):
        return None
    latest_open = session.scalars(
        select(Alert).where(*subject, Alert.cleared_at.is_(None)).order_by(Alert.at.desc(), Alert.id.desc()).limit(1)
    ).first()
    if latest_open is not None and (at - utc(latest_open.at)).total_seconds() < policy.repeat_s:
        return None
    if window.bundle_id:
        # Drift is a property of the model meeting new data: one open alert (one retrain call) per bundle,
        # the other devices that see it are added to that alert instead of raising their own.
        model_open = session.scalars(
            select(Alert).where(Alert.kind == DRIFT, Alert.bundle_id == window.bundle_id, Alert.cleared_at.is_(None))
            .order_by(Alert.at.desc(), Alert.id.desc()).limit(1)
        ).first()
        if model_open is not None and (at - utc(model_open.at)).total_seconds() < policy.repeat_s:
            devices = list((model_open.details or {}).get("devices") or [model_open.device_id])
            if window.device_id not in devices:
                model_open.details = {**(model_open.details or {}), "devices": sorted([*devices, window.device_id])}
                session.commit()
            return None

    device = session.get(Device, window.device_id)
    bundle = session.get(Bundle, window.bundle_id) if window.bundle_id else None
    details: dict[str, Any] = {
        "score": round(score, 6), "threshold": policy.threshold, "worst": worst,
        "scores": {name: round(value, 6) for name, value in sorted(scores.items())},
        "drift_method": (window.payload or {}).get("drift_method"),
        "profile": device.profile if device else None,
        "bundle": {"name": bundle.name, "version": bundle.version, "profile": bundle.profile} if bundle else None,
        "window": {"id": window.id, "received_at": utc(window.received_at).isoformat(), "window_s": window.window_s,
                   "inferences": window.inferences},
        "repeat_of": latest_open.id if latest_open is not None else None,
        "devices": [window.device_id],
    }
    alert = Alert(at=at, kind=DRIFT, device_id=window.device_id, bundle_id=window.bundle_id, details=details,
                  delivered=False, attempts=0)
    session.add(alert)
    session.flush()
    audit.record(session, ACTOR, "alert.drift", window.device_id,
                 {"alert_id": alert.id, "bundle_id": window.bundle_id, "score": details["score"], "worst": worst,
                  "threshold": policy.threshold})
    session.commit()
    _count("ALERTS_RAISED", kind=DRIFT)
    log.warning("device %s: drift %s=%.3g above %.3g on bundle %s: alert %d raised", window.device_id, worst, score,
                policy.threshold, window.bundle_id, alert.id)
    return alert


def _iso(value: dt.datetime | None) -> str | None:
    value = utc(value)
    return None if value is None else value.isoformat()


def alert_payload(alert: Alert) -> dict[str, Any]:
    """What the webhook receives (and the API lists)."""
    return {
        "event": "edgepack.alert", "id": alert.id, "kind": alert.kind, "at": _iso(alert.at),
        "device_id": alert.device_id, "bundle_id": alert.bundle_id, "details": alert.details or {},
        "open": alert.cleared_at is None, "cleared_at": _iso(alert.cleared_at),
    }


def list_alerts(session: Session, *, kind: str | None = None, device_id: str | None = None,
                delivered: bool | None = None, open_only: bool | None = None, before_id: int | None = None,
                limit: int = 100) -> list[Alert]:
    """Alerts, newest first, optionally filtered; page with `before_id`."""
    query = select(Alert).order_by(Alert.id.desc()).limit(limit)
    if kind:
        query = query.where(Alert.kind == kind)
    if device_id:
        query = query.where(Alert.device_id == device_id)
    if delivered is not None:
        query = query.where(Alert.delivered.is_(delivered))
    if open_only is not None:
        query = query.where(Alert.cleared_at.is_(None) if open_only else Alert.cleared_at.is_not(None))
    if before_id is not None:
        query = query.where(Alert.id < before_id)
    return list(session.scalars(query))


class AlertDispatcher:
    """POSTs undelivered alerts to a webhook from a background thread (see the module docstring)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        url: str,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 8,
        backoff_s: float = 2.0,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"alert webhook {url!r}: expected an http:// or https:// URL")
        self.session_factory = session_factory
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # No jitter: one dispatcher per alert row (claimed in the database), so there is no herd to spread.
        self._retry = RetryPolicy(base_s=backoff_s, max_s=max_backoff_s)
        self.clock = clock
        self._wake = threading.Event()
        self._client: httpx.Client | None = None

    def notify(self, alert: Alert | None = None) -> None:
        """Deliver soon (the bridge calls this when it raised an alert)."""
        self._wake.set()

    def retry_delay_s(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed try before the next one."""
        return self._retry.ceiling(attempts)

    def _due(self, alert: Alert, now: dt.datetime) -> bool:
        if alert.last_attempt_at is None:
            return True
        return (now - utc(alert.last_attempt_at)).total_seconds() >= self.retry_delay_s(alert.attempts)

    def deliver_due(self) -> int:
        """One pass: try every undelivered alert whose retry time has come; returns how many were delivered."""
        now = utc(self.clock())
        with self.session_factory() as session:
            pending = session.scalars(
                select(Alert).where(Alert.delivered.is_(False), Alert.attempts < self.max_attempts)
                .order_by(Alert.id).limit(100)
            ).all()
            due = [(alert.id, alert.attempts, alert_payload(alert)) for alert in pending if self._due(alert, now)]
        delivered = 0
        for alert_id, attempts, payload in due:
            if self._claim(alert_id, attempts, now):
                delivered += self._deliver(alert_id, attempts + 1, payload)
        return delivered

    def _claim(self, alert_id: int, attempts: int, now: dt.datetime) -> bool:
        with self.session_factory() as session:
            claimed = session.execute(
                update(Alert).where(Alert.id == alert_id, Alert.delivered.is_(False), Alert.attempts == attempts)
                .values(attempts=attempts + 1, last_attempt_at=now).execution_options(synchronize_session=False)
            ).rowcount
            session.commit()
        return claimed == 1

    def _deliver(self, alert_id: int, attempt: int, payload: dict[str, Any]) -> int:
        error = self._post({**payload, "attempt": attempt}, alert_id)
        with self.session_factory() as session:
            values: dict[str, Any] = {"last_error": error}
            if error is None:
                values.update(delivered=True, delivered_at=utc(self.clock()))
            session.execute(update(Alert).where(Alert.id == alert_id).values(**values)
                            .execution_options(synchronize_session=False))
            session.commit()
        _count("ALERT_DELIVERIES", result="delivered" if error is None else "failed")
        if error is None:
            log.info("alert %d delivered to %s (attempt %d)", alert_id, self.url, attempt)
            return 1
        final = attempt >= self.max_attempts
        log.warning("alert %d: webhook %s failed (attempt %d of %d): %s%s", alert_id, self.url, attempt,
                    self.max_attempts, error, "; giving up" if final else "")
        return 0

    def _post(self, body: dict[str, Any], alert_id: int) -> str | None:
        """None when the webhook accepted the alert, else what went wrong in one line."""
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=False,
                                        headers={"User-Agent": "edgepack-fleet"})
        try:
            response = self._client.post(self.url, json=body, headers={"X-Edgepack-Alert-Id": str(alert_id)})
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # ------------------------------------------------------------ the thread

    def run(self, stop_event: threading.Event, interval_s: float = 1.0) -> None:
        """deliver_due() until `stop_event` is set: after each notify(), else every `interval_s`."""
        try:
            while not stop_event.is_set():
                try:
                    self.deliver_due()
                except Exception:  # a database hiccup must not end deliveries; the next pass retries
                    log.exception("alert delivery pass failed")
                self._wake.wait(interval_s)
                self._wake.clear()
        finally:
            self.close()

    def start_thread(self, stop_event: threading.Event, interval_s: float = 1.0) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop_event, interval_s), name="alert-dispatcher", daemon=True)
        thread.start()
        return thread


__all__ = [
    "CLEAR_FRACTION", "DRIFT", "AlertDispatcher", "DriftAlertPolicy", "alert_payload", "check_drift",
    "in_active_rollout", "list_alerts", "needs_drift_check", "open_drift_subjects",
]
