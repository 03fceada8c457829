"""/api/v1/devices: enrollment tokens, enrollment, listing by label selector, status reports over HTTP."""

from __future__ import annotations

from fastapi import APIRouter, Request

from edgepack.errors import PermissionDenied
from fleet import metrics
from fleet.api.params import AUTHED, WITH_BODY, DeviceIdPath, ProfileQuery, SelectorQuery, error_responses
from fleet.api.schemas import (
    CredentialRotated,
    DevicePublic,
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollRequest,
    EnrollResponse,
    StatusAccepted,
    StatusReport,
)
from fleet.auth import DeviceDep, DevicesRead, DevicesWrite, SessionDep
from fleet.broker import DeviceIdentities, NoBrokerIdentities
from fleet.director import director_for
from fleet.services import devices

router = APIRouter(prefix="/devices", tags=["devices"])


@router.post("/enrollment-tokens", status_code=201, response_model=EnrollmentTokenCreated,
             responses=error_responses(400, *WITH_BODY))
def create_enrollment_token(body: EnrollmentTokenCreate, principal: DevicesWrite,
                            session: SessionDep) -> EnrollmentTokenCreated:
    plain, row = devices.create_enrollment_token(session, principal.actor, labels=body.labels, uses=body.uses,
                                                 ttl_s=body.ttl_s, profile=body.profile, bind_labels=body.bind_labels)
    return EnrollmentTokenCreated(id=row.id, token=plain, labels=row.labels, uses=row.uses_left,
                                  expires_at=row.expires_at)


@router.post("/enroll", status_code=201, response_model=EnrollResponse,
             responses=error_responses(400, *WITH_BODY, 409, 503))
def enroll(body: EnrollRequest, session: SessionDep, request: Request) -> EnrollResponse:
    """No bearer token: the enrollment token in the body is the credential (spent by this call); 401 when
    it is unknown, 403 when used up or expired, 409 when another request enrolled the same id at once.
    The answer carries the fleet's director key, which the device pins to check every desired state."""
    credential, device, created = devices.enroll(session, token=body.token, device_id=body.device_id,
                                                 profile=body.profile, labels=body.labels,
                                                 identities=_identities(request))
    fleet_key = director_for(request.app.state.settings.data_dir).public()
    return EnrollResponse(device_id=device.id, credential=credential, profile=device.profile,
                          labels=device.labels, reenrolled=not created, fleet_key=fleet_key)


def _identities(request: Request) -> DeviceIdentities:
    """The broker side of device credentials (`fleet serve` sets it; an app without one manages no broker)."""
    return getattr(request.app.state, "device_identities", None) or NoBrokerIdentities()


@router.post("/{device_id}/revoke", response_model=DevicePublic, responses=error_responses(*AUTHED, 404, 503))
def revoke_device(device_id: DeviceIdPath, principal: DevicesWrite, session: SessionDep,
                  request: Request) -> DevicePublic:
    """The device's credential stops working on HTTP at once, its MQTT identity is deleted and its open
    session closed; 503 when the broker did not confirm (the fleet side is revoked: call it again)."""
    return DevicePublic.model_validate(devices.revoke_device(session, principal.actor, device_id,
                                                             identities=_identities(request)))


@router.post("/{device_id}/rotate-credential", response_model=CredentialRotated,
             responses=error_responses(*AUTHED, 404, 409, 503))
def rotate_credential(device_id: DeviceIdPath, principal: DevicesWrite, session: SessionDep,
                      request: Request) -> CredentialRotated:
    """A new secret for the device (HTTP and MQTT), shown once; the old one stops working. 409: revoked."""
    credential, device = devices.rotate_credential(session, principal.actor, device_id,
                                                   identities=_identities(request))
    return CredentialRotated(device_id=device.id, credential=credential)


@router.get("", response_model=list[DevicePublic], responses=error_responses(400, *AUTHED))
def list_devices(_: DevicesRead, session: SessionDep, selector: SelectorQuery = None, profile: ProfileQuery = None,
                 online: bool | None = None) -> list[DevicePublic]:
    return [DevicePublic.model_validate(d) for d in devices.list_devices(session, selector=selector,
                                                                         profile=profile, online=online)]


@router.get("/{device_id}", response_model=DevicePublic, responses=error_responses(*AUTHED, 404))
def get_device(device_id: DeviceIdPath, _: DevicesRead, session: SessionDep) -> DevicePublic:
    return DevicePublic.model_validate(devices.get_device(session, device_id))


@router.post("/{device_id}/status", response_model=StatusAccepted, responses=error_responses(400, *WITH_BODY))
def report_status(device_id: DeviceIdPath, status: StatusReport, principal: DeviceDep, session: SessionDep,
                  request: Request) -> StatusAccepted:
    """A device reports its status over HTTP (the same DeviceStatus it publishes over MQTT); only for
    its own id: another id in the path or in the body is 403."""
    principal.require_device(device_id)
    if status.device_id != device_id:
        raise PermissionDenied(f"device {device_id} may not report a status for device {status.device_id}",
                               device_id=device_id)
    from fleet.services.status import apply_status  # the rollout engine's module; imported when used

    applied = apply_status(session, status)
    metrics.DEVICE_STATUS_HTTP.inc()
    return StatusAccepted(device_id=device_id, applied=applied is not False)
