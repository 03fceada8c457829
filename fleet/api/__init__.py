"""The fleet HTTP API: `api_router` (mounted under /api/v1) and `system_router` (/healthz, /metrics).

    method  path                                   who
    POST    /bundles                               operator
    GET     /bundles, /bundles/{id}                viewer
    GET     /bundles/{id}/download  (and HEAD)     viewer, or any device credential
    POST    /bundles/{id}/promote                  operator
    POST    /devices/enrollment-tokens             operator
    POST    /devices/enroll                        an enrollment token, in the body
    GET     /devices, /devices/{id}                viewer
    POST    /devices/{id}/status                   that device's own credential
    POST    /rollouts, /rollouts/{id}/{action}     operator
    GET     /rollouts, /rollouts/{id}              viewer
    POST    /tokens, /tokens/{id}/revoke           admin
    GET     /tokens, /audit                        admin
    GET     /alerts                                viewer
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
