"""The fleet server's FastAPI application.

`create_app(settings)` wires settings, database, bundle store and routes, and touches nothing until
the app starts: startup creates the data folder, migrates the database (`fleet.db.migrate`), makes sure
an admin token exists, then enters each `lifespan_hooks` entry — async context managers taking the app,
which is how the rollout controller and the MQTT bridge attach — and leaves them in reverse on shutdown.

Errors: every `EdgepackError` a route or service raises becomes `{"detail", "error"}` with the class's
`http_status` (401 adds `WWW-Authenticate`, 416 adds `Content-Range: bytes */size`); each route documents
the statuses it answers (`fleet.api.params.error_responses`). A request body over `MAX_BODY_BYTES` is a 413,
except a bundle upload, which streams to disk under its own limit (`max_bundle_bytes`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from edgepack.errors import ConfigError, EdgepackError, PayloadTooLarge, RangeNotSatisfiable
from edgepack.signing import load_public_key
from fleet import metrics
from fleet.api import API_PREFIX, api_router, system_router
from fleet.auth import bootstrap_admin_token
from fleet.db import make_engine, make_session_factory, migrate
from fleet.settings import FleetSettings
from fleet.store import BundleStore, store_for

log = logging.getLogger(__name__)

LifespanHook = Callable[[FastAPI], AbstractAsyncContextManager[Any]]

MAX_BODY_BYTES = 1024 * 1024  # every JSON body the API takes (a status, a rollout) is a few kilobytes
_UPLOAD_PATH = f"{API_PREFIX}/bundles"


def check_database(engine: Engine) -> None:
    """Refuse to start against a database that does not answer: one ConfigError naming the URL without its
    password (SQLAlchemy's error is a traceback-sized message)."""
    try:
        with engine.connect():
            return
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    safe = engine.url.render_as_string(hide_password=True)
    raise ConfigError(f"database {safe} is unreachable: {reason} (check --db-url)", url=safe) from None


def prepare(settings: FleetSettings, engine: Engine) -> str | None:
    """Create the data folder, check the database answers, migrate it, ensure an admin token; returns a newly
    created admin token (for the CLI to print once) or None. Safe to call again: startup calls it too."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    check_database(engine)
    migrate(engine)
    with make_session_factory(engine)() as session:
        return bootstrap_admin_token(session, settings)


async def _edgepack_error(request: Request, exc: EdgepackError) -> JSONResponse:
    headers: dict[str, str] = {}
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RangeNotSatisfiable) and isinstance(getattr(exc, "size", None), int):
        headers["Content-Range"] = f"bytes */{exc.size}"
    if exc.http_status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse({"detail": exc.message, "error": type(exc).__name__}, status_code=exc.http_status,
                        headers=headers)


def _too_large_body() -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes", limit=MAX_BODY_BYTES)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's and Starlette's own refusals (a body that is not UTF-8, an unknown path or method) in the
    # same {"detail", "error"} shape as ours, so one error model documents every non-validation error.
    return JSONResponse({"detail": str(exc.detail), "error": "HTTPException"}, status_code=exc.status_code,
                        headers=exc.headers)


class BodyLimitMiddleware:
    """Refuses request bodies over MAX_BODY_BYTES with a 413 before a route parses them: a declared
    Content-Length at once, a chunked body when its bytes pass the limit. The bundle upload is left to
    its own, larger limit."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] == _UPLOAD_PATH):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await self._refuse(scope, receive, send)
            return
        received, refused = 0, False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    # Answer now and tell the route the client left: its own answer (FastAPI words a
                    # failed body read as a 400) is then dropped by guarded_send.
                    refused = True
                    await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    @staticmethod
    async def _refuse(scope, receive, send) -> None:
        exc = _too_large_body()
        response = JSONResponse({"detail": exc.message, "error": type(exc).__name__}, status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts requests by method, route template and status; the template (not the raw path) keeps the
    label values bounded. Templates come from the app's OpenAPI paths, a public and stable view of the
    routes whatever way the routers were included."""

    def __init__(self, app, *, api: FastAPI) -> None:
        self.app = app
        self._api = api
        self._templates: list[tuple[re.Pattern[str], set[str], str]] | None = None

    def _template(self, scope) -> str:
        if "endpoint" not in scope:
            return "unmatched"
        if self._templates is None:
            self._templates = [
                (compile_path(path)[0], {method.upper() for method in operations}, path)
                for path, operations in self._api.openapi().get("paths", {}).items()
            ]
        method, path = scope["method"], scope["path"]
        for pattern, methods, template in self._templates:
            if method in methods and pattern.match(path):
                return template
        return "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_count(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                metrics.HTTP_REQUEST_SECONDS.labels(self._template(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            metrics.HTTP_REQUESTS.labels(scope["method"], self._template(scope), str(status)).inc()


def create_app(settings: FleetSettings, *, engine: Engine | None = None, store: BundleStore | None = None,
               lifespan_hooks: Sequence[LifespanHook] = ()) -> FastAPI:
    """The fleet API app. `engine` and `store` default to those the settings name; an engine passed in
    is not disposed on shutdown (its owner does that), and a store passed in is not checked at startup (its
    owner did that: `fleet serve` checks before anything starts)."""
    owns_engine = engine is None
    owns_store = store is None
    engine = engine if engine is not None else make_engine(settings.database_url)
    store = store if store is not None else store_for(settings)
    trusted_keys = [load_public_key(path) for path in settings.trusted_keys]
    hooks = tuple(lifespan_hooks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.new_admin_token = await run_in_threadpool(prepare, settings, engine)
        check_store = getattr(store, "check", None)
        if owns_store and check_store is not None:  # an object store that does not answer: a startup error
            await run_in_threadpool(check_store)
        if app.state.new_admin_token:
            log.warning("created an admin token: it is in %s (mode 0600)", settings.admin_token_file)
        if not trusted_keys:
            log.warning("no trusted keys configured: every bundle upload will be refused")
        try:
            async with AsyncExitStack() as stack:
                for hook in hooks:
                    await stack.enter_async_context(hook(app))
                yield
        finally:
            if owns_engine:
                engine.dispose()

    app = FastAPI(title="edgepack fleet", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.store = store
    app.state.trusted_keys = trusted_keys
    app.state.new_admin_token = None
    app.add_exception_handler(EdgepackError, _edgepack_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestMetricsMiddleware, api=app)
    app.include_router(api_router)
    app.include_router(system_router)
    return app


__all__ = ["BodyLimitMiddleware", "LifespanHook", "MAX_BODY_BYTES", "RequestMetricsMiddleware", "check_database", "create_app", "prepare"]
