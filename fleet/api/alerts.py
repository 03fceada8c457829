"""/api/v1/alerts: what the fleet raised about devices' models (drift outside a rollout), with delivery state."""

from __future__ import annotations

from fastapi import APIRouter, Query

from fleet.api.params import AUTHED, BeforeIdQuery, DeviceIdQuery, KindQuery, LimitQuery, error_responses
from fleet.api.schemas import AlertPublic
from fleet.auth import AlertsRead, SessionDep
from fleet.services import alerts

router = APIRouter(prefix="/alerts", tags=["alerts"])


@router.get("", response_model=list[AlertPublic], responses=error_responses(*AUTHED))
def list_alerts(_: AlertsRead, session: SessionDep, kind: KindQuery = None, device_id: DeviceIdQuery = None,
                delivered: bool | None = None,
                open_only: bool | None = Query(default=None, alias="open"), before_id: BeforeIdQuery = None,
                limit: LimitQuery = 100) -> list[AlertPublic]:
    """Newest first; `open=true` only alerts not cleared yet; page with `before_id`."""
    rows = alerts.list_alerts(session, kind=kind, device_id=device_id, delivered=delivered, open_only=open_only,
                              before_id=before_id, limit=limit)
    return [AlertPublic.model_validate(row) for row in rows]
