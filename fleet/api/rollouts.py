"""/api/v1/rollouts: thin routes over `fleet.services.rollouts` (the rollout engine).

The engine module is imported inside each route, so the API (and its tests) work before and without it;
until it exists these routes answer 501.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fastapi import APIRouter, HTTPException

from fleet.api.schemas import RolloutAction, RolloutCreate
from fleet.auth import OperatorDep, SessionDep, ViewerDep
from fleet.services import bundles
from fleet.services.devices import parse_selector

router = APIRouter(prefix="/rollouts", tags=["rollouts"])

_ACTIONS = {"pause": "pause", "resume": "resume", "abort": "abort", "rollback": "manual_rollback"}


def _engine() -> ModuleType:
    try:
        from fleet.services import rollouts
    except ModuleNotFoundError as exc:
        if exc.name != "fleet.services.rollouts":
            raise
        raise HTTPException(status_code=501, detail="rollouts are not available in this server") from None
    return rollouts


@router.post("", status_code=201)
def create_rollout(body: RolloutCreate, principal: OperatorDep, session: SessionDep) -> dict[str, Any]:
    engine = _engine()
    bundle = bundles.get_bundle(session, body.bundle_id)
    return engine.create_rollout(session, principal.actor, bundle.id, selector=parse_selector(body.selector),
                                 waves=body.waves, gates=body.gates, bake_s=body.bake_s,
                                 min_reports=body.min_reports, install_timeout_s=body.install_timeout_s)


@router.get("")
def list_rollouts(_: ViewerDep, session: SessionDep) -> list[dict[str, Any]]:
    return _engine().list_rollouts(session)


@router.get("/{rollout_id}")
def get_rollout(rollout_id: str, _: ViewerDep, session: SessionDep) -> dict[str, Any]:
    return _engine().rollout_status(session, rollout_id)


@router.post("/{rollout_id}/{action}")
def act_on_rollout(rollout_id: str, action: RolloutAction, principal: OperatorDep,
                   session: SessionDep) -> dict[str, Any]:
    """pause, resume, abort or rollback (manual: every touched device goes back to its previous bundle)."""
    return getattr(_engine(), _ACTIONS[action])(session, principal.actor, rollout_id)
