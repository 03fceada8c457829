"""/api/v1/alerts: what the fleet raised about devices' models (drift outside a rollout), with delivery state."""

from __future__ import annotations

from fastapi import APIRouter, Query

from fleet.api.schemas import AlertPublic
from fleet.auth import SessionDep, ViewerDep
from fleet.services import alerts

router = APIRouter(prefix="/alerts", tags=["alerts"])

MAX_PAGE = 1000


@router.get("", response_model=list[AlertPublic])
def list_alerts(_: ViewerDep, session: SessionDep, kind: str | None = None, device_id: str | None = None,
                delivered: bool | None = None,
                open_only: bool | None = Query(default=None, alias="open"), before_id: int | None = None,
                limit: int = Query(default=100, ge=1, le=MAX_PAGE)) -> list[AlertPublic]:
    """Newest first; `open=true` only alerts not cleared yet; page with `before_id`."""
    rows = alerts.list_alerts(session, kind=kind, device_id=device_id, delivered=delivered, open_only=open_only,
                              before_id=before_id, limit=limit)
    return [AlertPublic.model_validate(row) for row in rows]
