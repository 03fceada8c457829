"""/api/v1/bundles: upload (verified before it is stored), list, describe, promote, ranged download."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from edgepack.errors import BundleError, PayloadTooLarge
from fleet.api.params import (
    AUTHED,
    WITH_BODY,
    BundleIdPath,
    LimitQuery,
    NameQuery,
    ProfileQuery,
    StageQuery,
    error_responses,
)
from fleet.api.schemas import BundleDetail, BundlePublic, PromoteRequest, TelemetryRollupPublic
from fleet.auth import BundlesRead, BundlesWrite, SessionDep, ViewerOrDeviceDep
from fleet.services import bundles
from fleet.store import BundleStore

router = APIRouter(prefix="/bundles", tags=["bundles"])
_COPY_CHUNK = 1024 * 1024
_DOWNLOAD_RESPONSES = {
    200: {"description": "The bundle file", "content": {"application/octet-stream": {}}},
    206: {"description": "The requested byte range", "content": {"application/octet-stream": {}}},
    304: {"description": "If-None-Match named the bundle's ETag"},
    307: {"description": "With an object store: a fresh presigned URL of the bundle in Location (GET it with "
                         "Range as here, without this API's Authorization header)"},
    **error_responses(400, *AUTHED, 404, 416, 503),
}


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"bundle upload exceeds the server's limit of {limit} bytes", limit=limit)


async def _receive_upload(request: Request, store: BundleStore, limit: int) -> Path:
    """Write the request body (raw, or the multipart field `bundle`) to a temp file inside the store."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise _too_large(limit)
    upload = store.new_upload()
    received = 0
    try:
        with open(upload, "wb") as sink:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                async with request.form(max_files=1, max_fields=8) as form:
                    part = form.get("bundle")
                    if not isinstance(part, UploadFile):
                        raise BundleError("multipart upload has no file field named 'bundle'")
                    while chunk := await part.read(_COPY_CHUNK):
                        received += len(chunk)
                        if received > limit:
                            raise _too_large(limit)
                        sink.write(chunk)
            else:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise _too_large(limit)
                    sink.write(chunk)
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    return upload


# The body is read as a stream (not parsed by FastAPI), so its two forms are declared here for the OpenAPI.
_UPLOAD_BODY = {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["bundle"],
                                       "properties": {"bundle": {"type": "string", "format": "binary"}}}},
}}


@router.post("", status_code=201, response_model=BundleDetail, openapi_extra={"requestBody": _UPLOAD_BODY}, responses={
    200: {"model": BundleDetail, "description": "The same bundle was already stored"},
    **error_responses(400, *WITH_BODY, 503)})
async def upload_bundle(request: Request, response: Response, principal: BundlesWrite,
                        session: SessionDep) -> BundleDetail:
    """Upload a bundle as the raw body (application/octet-stream) or multipart field `bundle`.
    201 when new, 200 when the same bundle was already stored; 400 naming the problem when it does
    not verify against the server's trusted keys (nothing is stored then)."""
    state = request.app.state
    upload = await _receive_upload(request, state.store, state.settings.max_bundle_bytes)
    bundle, created = await run_in_threadpool(
        bundles.add_bundle, session, state.store, upload, trusted_keys=state.trusted_keys, actor=principal.actor
    )
    if not created:
        response.status_code = 200
    return BundleDetail.model_validate(bundle)


@router.get("", response_model=list[BundlePublic], responses=error_responses(*AUTHED))
def list_bundles(_: BundlesRead, session: SessionDep, name: NameQuery = None, profile: ProfileQuery = None,
                 stage: StageQuery = None) -> list[BundlePublic]:
    return [BundlePublic.model_validate(b) for b in bundles.list_bundles(session, name=name, profile=profile,
                                                                         stage=stage)]


@router.get("/{bundle_id}", response_model=BundleDetail, responses=error_responses(400, *AUTHED, 404))
def get_bundle(bundle_id: BundleIdPath, _: BundlesRead, session: SessionDep) -> BundleDetail:
    return BundleDetail.model_validate(bundles.get_bundle(session, bundle_id))


@router.get("/{bundle_id}/telemetry", response_model=list[TelemetryRollupPublic], responses=error_responses(400, *AUTHED, 404))
def bundle_telemetry(bundle_id: BundleIdPath, _: BundlesRead, session: SessionDep,
                     limit: LimitQuery = 168) -> list[TelemetryRollupPublic]:
    """Hourly aggregates of the bundle's telemetry per hardware profile, newest first: what remains of its
    windows once they aged out of raw retention (`telemetry_retention_days`)."""
    from fleet.services.retention import bundle_rollups

    bundle = bundles.get_bundle(session, bundle_id)
    return [TelemetryRollupPublic.model_validate(row) for row in bundle_rollups(session, bundle.id, limit=limit)]


@router.post("/{bundle_id}/promote", response_model=BundlePublic, responses=error_responses(400, *WITH_BODY, 404))
def promote_bundle(bundle_id: BundleIdPath, body: PromoteRequest, principal: BundlesWrite,
                   session: SessionDep) -> BundlePublic:
    return BundlePublic.model_validate(bundles.promote(session, bundle_id, body.stage, actor=principal.actor))


@router.head("/{bundle_id}/download", response_class=Response, responses=_DOWNLOAD_RESPONSES)
def bundle_download_headers(bundle_id: BundleIdPath, request: Request, principal: ViewerOrDeviceDep,
                            session: SessionDep) -> Response:
    """The download's headers (size, ETag, Accept-Ranges) without the body."""
    return download_bundle(bundle_id, request, principal, session)


@router.get("/{bundle_id}/download", response_class=StreamingResponse, responses=_DOWNLOAD_RESPONSES)
def download_bundle(bundle_id: BundleIdPath, request: Request, principal: ViewerOrDeviceDep, session: SessionDep) -> Response:
    """The bundle file; a single `Range` (`bytes=a-b`, `bytes=a-`, `bytes=-n`) gives 206 with
    Content-Range, an unsatisfiable one 416; `If-Range` and `If-None-Match` take the ETag (the sha256).
    With an S3-compatible store the answer is a 307 to a fresh presigned URL instead: the bytes come from
    the store, and an agent whose URL expired comes here for a new one."""
    store = request.app.state.store
    bundle = bundles.get_bundle(session, bundle_id)
    presigned = bundles.presigned_download(store, bundle)
    if presigned is not None:
        session.close()
        return Response(status_code=307, headers={"Location": presigned, "Cache-Control": "no-store"})
    size = store.size(bundle.id)  # NotFound when the file is missing from the store
    # The database is done with: give the connection back before the body streams. A download holding its
    # connection for the whole transfer exhausts the pool when hundreds of devices fetch one wave's bundle,
    # and the requests waiting for a connection then hold every worker thread the streams need (a hang).
    session.close()
    tag = bundles.etag(bundle.id)
    headers = {
        "ETag": tag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=31536000, immutable",
        "Content-Disposition": f'attachment; filename="{bundle.name}-{bundle.version}-{bundle.profile}.edgepack"',
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and (if_none_match.strip() == "*" or tag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    byte_range = None
    if bundles.range_applies(request.headers.get("if-range"), bundle.id):
        byte_range = bundles.parse_range(request.headers.get("range"), size)
    status = 206 if byte_range else 200
    if byte_range:
        headers["Content-Range"] = byte_range.content_range
    headers["Content-Length"] = str(byte_range.length if byte_range else size)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(bundles.iter_file(store, bundle.id, byte_range, size), status_code=status,
                             headers=headers, media_type="application/octet-stream")
