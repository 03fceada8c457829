"""/api/v1/rollouts: thin routes over `fleet.services.rollouts` (the rollout engine)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleet.api.params import AUTHED, WITH_BODY, RolloutIdPath, error_responses
from fleet.api.schemas import RolloutAction, RolloutCreate
from fleet.auth import RolloutsRead, RolloutsWrite, SessionDep
from fleet.services import bundles, rollouts
from fleet.services.devices import parse_selector

router = APIRouter(prefix="/rollouts", tags=["rollouts"])

_ACTIONS = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort,
            "rollback": rollouts.manual_rollback}


@router.post("", status_code=201, responses=error_responses(400, *WITH_BODY, 404, 409))
def create_rollout(body: RolloutCreate, principal: RolloutsWrite, session: SessionDep, request: Request) -> dict[str, Any]:
    """400 when no enrolled device matches or a wave or gate is invalid, 409 when the targets overlap an
    active rollout."""
    bundle = bundles.get_bundle(session, body.bundle_id)
    created = rollouts.create_rollout(session, principal.actor, bundle.id, selector=parse_selector(body.selector),
                                   waves=body.waves, gates=body.gates, bake_s=body.bake_s,
                                   min_reports=body.min_reports, install_timeout_s=body.install_timeout_s,
                                   max_bake_s=body.max_bake_s, holdback_percent=body.holdback_percent,
                                   max_per_minute=body.max_per_minute, max_concurrent=body.max_concurrent,
                                   maintenance_windows=[w.model_dump() for w in body.maintenance_windows],
                                   late_joiners=body.late_joiners)
    _notify_controller(request)
    return created


@router.get("", responses=error_responses(*AUTHED))
def list_rollouts(_: RolloutsRead, session: SessionDep) -> list[dict[str, Any]]:
    return rollouts.list_rollouts(session)


@router.get("/{rollout_id}", responses=error_responses(*AUTHED, 404))
def get_rollout(rollout_id: RolloutIdPath, _: RolloutsRead, session: SessionDep) -> dict[str, Any]:
    return rollouts.rollout_status(session, rollout_id)


@router.post("/{rollout_id}/{action}", responses=error_responses(*AUTHED, 404, 409))
def act_on_rollout(rollout_id: RolloutIdPath, action: RolloutAction, principal: RolloutsWrite,
                   session: SessionDep, request: Request) -> dict[str, Any]:
    """pause, resume, abort or rollback (manual: every touched device goes back to its previous bundle);
    409 when the rollout's status does not allow it."""
    result = _ACTIONS[action](session, principal.actor, rollout_id)
    _notify_controller(request)
    return result


def _notify_controller(request: Request) -> None:
    """The controller of this replica starts what changed now, not at its next pass (another replica's
    controller, when this one is standby, at its next pass)."""
    controller = getattr(request.app.state, "rollout_controller", None)
    if controller is not None:
        controller.notify()
