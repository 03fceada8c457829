"""A small HTTP client for the fleet API, used by the admin CLI commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError, EdgepackError


class FleetRequestFailed(EdgepackError):
    """The fleet answered with an error; exit 2 for a 4xx (the request was wrong), 1 for a 5xx."""


def resolve(fleet_url: str | None, token: str | None) -> tuple[str, str]:
    url = fleet_url or os.environ.get("EDGEPACK_FLEET_URL") or "http://127.0.0.1:8080"
    token = token or os.environ.get("EDGEPACK_TOKEN")
    if not token:
        raise ConfigError("no API token: pass --token or set EDGEPACK_TOKEN (`edgepack fleet serve` printed the admin token "
                          "and stored it in <data-dir>/admin.token)")
    return url.rstrip("/"), token


class FleetClient:
    def __init__(self, fleet_url: str | None = None, token: str | None = None, timeout_s: float = 60.0,
                 verify: Any = True) -> None:
        import httpx

        self.url, token = resolve(fleet_url, token)
        # verify: an ssl.SSLContext for an https:// fleet signed by a private CA (httpx's default: the system store)
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s,
                                  verify=verify)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, "/api/v1" + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot reach the fleet at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:200]
            error = FleetRequestFailed(f"fleet answered {response.status_code}: {detail}")
            error.exit_code = 2 if response.status_code < 500 else 1
            raise error
        return response.json() if response.content else None

    def upload(self, bundle: Path) -> dict[str, Any]:
        if not bundle.is_file():
            raise ConfigError(f"bundle {bundle} does not exist")
        with open(bundle, "rb") as handle:
            return self.request("POST", "/bundles", content=handle.read(), headers={"Content-Type": "application/octet-stream"})
