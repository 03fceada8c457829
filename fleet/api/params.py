"""Bounded request parameters and the documented error responses of the fleet API.

Every integer, string and list a client sends is bounded here or in `fleet.api.schemas`, so a value the
database or a service cannot hold is a 422 from validation, never a 500 from below: row ids and `before_id`
fit PostgreSQL's INTEGER (the narrowest id column), strings fit their columns, pages are capped.

`error_responses(401, 403, 404)` documents the `{"detail", "error"}` body the app sends for each
`EdgepackError` (`fleet.app`), so the OpenAPI lists every status a route can answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, Field

from edgepack.protocol import MAX_STORED_INT

MAX_ROW_ID = MAX_STORED_INT  # PostgreSQL INTEGER; SQLite's is wider, so this bound holds on both
MAX_PAGE = 1000

RowIdPath = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
BeforeIdQuery = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID, description="Only entries older than this id")]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Page size, at most {MAX_PAGE}")]
BundleIdPath = Annotated[str, Path(min_length=1, max_length=64, description="sha256, or a prefix of 8+ hex digits")]
DeviceIdPath = Annotated[str, Path(min_length=1, max_length=128)]
RolloutIdPath = Annotated[str, Path(min_length=1, max_length=36)]
NameQuery = Annotated[str | None, Query(max_length=128)]
ProfileQuery = Annotated[str | None, Query(max_length=64)]
StageQuery = Annotated[str | None, Query(max_length=16)]
SelectorQuery = Annotated[str | None, Query(max_length=4096, description="Label selector k=v,k2=v2")]
DeviceIdQuery = Annotated[str | None, Query(max_length=128)]
KindQuery = Annotated[str | None, Query(max_length=32)]
ActionQuery = Annotated[str | None, Query(max_length=64, description="Exact, or a prefix ending in '.'")]
TargetQuery = Annotated[str | None, Query(max_length=128)]
ActorQuery = Annotated[str | None, Query(max_length=128)]


class ErrorBody(BaseModel):
    """What every refused request answers (validation errors aside, which are FastAPI's 422 body)."""

    detail: str = Field(description="One line saying what was wrong")
    error: str = Field(description="The edgepack.errors class, e.g. NotFound")


_MEANINGS = {
    400: "Invalid input (the detail names the value), or a bundle that does not verify",
    401: "No credential, or one unknown, revoked or expired",
    403: "A credential whose role, scope or device does not allow this",
    404: "The named bundle, device, rollout or token does not exist",
    409: "The request clashes with the current state",
    413: "The body is larger than the server accepts",
    416: "The Range lies outside the file",
    503: "A service behind the fleet did not answer: the MQTT broker (device identity changes) or the bundle store",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry of a route that may answer these error statuses."""
    return {code: {"model": ErrorBody, "description": _MEANINGS[code]} for code in codes}


# The statuses every route behind a bearer token may answer, and those with a JSON body too.
AUTHED = (401, 403)
WITH_BODY = (401, 403, 413)

__all__ = [
    "AUTHED",
    "ActionQuery",
    "ActorQuery",
    "BeforeIdQuery",
    "BundleIdPath",
    "DeviceIdPath",
    "DeviceIdQuery",
    "ErrorBody",
    "KindQuery",
    "LimitQuery",
    "MAX_PAGE",
    "MAX_ROW_ID",
    "NameQuery",
    "ProfileQuery",
    "RolloutIdPath",
    "RowIdPath",
    "SelectorQuery",
    "StageQuery",
    "TargetQuery",
    "WITH_BODY",
    "error_responses",
]
