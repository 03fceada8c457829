"""/healthz (no auth; checks the database) and /metrics (Prometheus text format, no auth)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from fleet import metrics
from fleet.models import Bundle, Device, Rollout

log = logging.getLogger(__name__)
router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    started = time.perf_counter()
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health check: database unreachable: %s", exc)
        return JSONResponse({"status": "error", "db": f"unreachable: {type(exc).__name__}"}, status_code=503)
    body = {"status": "ok", "db": "ok", "db_ms": round((time.perf_counter() - started) * 1000, 2)}
    leadership = getattr(request.app.state, "leadership", None)
    bridge = getattr(request.app.state, "mqtt_bridge", None)
    if leadership is not None:  # which replica runs the rollout controller
        body["controller"] = "leader" if leadership.leading else "standby"
    if bridge is not None:
        body["ingest_queue"] = bridge.ingestor.depth
    return JSONResponse(body)


class _DatabaseGauges:
    """Fleet state read from the database at scrape time."""

    def __init__(self, session_factory) -> None:
        self._session_factory = session_factory

    def collect(self):
        devices = GaugeMetricFamily("edgepack_devices", "Enrolled devices, by profile and online state.",
                                    labels=["profile", "online"])
        rollouts = GaugeMetricFamily("edgepack_rollouts", "Rollouts, by status.", labels=["status"])
        bundles = GaugeMetricFamily("edgepack_bundles", "Bundles in the registry.")
        with self._session_factory() as session:
            for profile, online, count in session.execute(
                select(Device.profile, Device.online, func.count()).group_by(Device.profile, Device.online)
            ):
                devices.add_metric([profile, "true" if online else "false"], count)
            for status, count in session.execute(select(Rollout.status, func.count()).group_by(Rollout.status)):
                rollouts.add_metric([status], count)
            bundles.add_metric([], session.scalar(select(func.count()).select_from(Bundle)) or 0)
        yield from (devices, rollouts, bundles)


@router.get("/metrics")
def prometheus_metrics(request: Request) -> Response:
    body = generate_latest(metrics.REGISTRY)
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_DatabaseGauges(request.app.state.session_factory))
    try:
        body += generate_latest(scrape)
    except SQLAlchemyError as exc:
        log.warning("metrics: database gauges skipped: %s", exc)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
