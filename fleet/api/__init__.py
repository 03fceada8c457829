"""The fleet HTTP API: `api_router` (mounted under /api/v1) and `system_router` (/healthz, /metrics).

    method  path                                   who                            scope (of a scoped token)
    POST    /bundles                               operator                       bundles:write
    GET     /bundles, /bundles/{id}                viewer                         bundles:read
    GET     /bundles/{id}/download  (and HEAD)     viewer, or any device credential  bundles:read
    POST    /bundles/{id}/promote                  operator                       bundles:write
    POST    /devices/enrollment-tokens             operator                       devices:write
    POST    /devices/enroll                        an enrollment token, in the body
    GET     /devices, /devices/{id}                viewer                         devices:read
    POST    /devices/{id}/status                   that device's own credential
    POST    /rollouts, /rollouts/{id}/{action}     operator                       rollouts:write
    GET     /rollouts, /rollouts/{id}              viewer                         rollouts:read
    POST    /tokens, /tokens/{id}/revoke           admin                          tokens:write
    GET     /tokens, /audit                        admin                          tokens:read, audit:read
    GET     /alerts                                viewer                         alerts:read

Every route documents the statuses it answers and bounds what it takes (`fleet.api.params`).
"""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api import admin, alerts, bundles, devices, rollouts
from fleet.api.system import router as system_router

API_PREFIX = "/api/v1"

api_router = APIRouter(prefix=API_PREFIX)
for _module in (bundles, devices, rollouts, alerts, admin):
    api_router.include_router(_module.router)

__all__ = ["API_PREFIX", "api_router", "system_router"]
