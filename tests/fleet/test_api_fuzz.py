"""The fleet's own OpenAPI, fuzzed with schemathesis against a real uvicorn server on SQLite.

Every operation of the live `/openapi.json` gets generated requests, valid (positive) and invalid
(negative), sent with a real admin token; the run fails on any 5xx, any status the OpenAPI does not
document for that route, and any response body that does not match its documented schema. It is bounded
(a few dozen cases per operation, derandomized, no deadline, no example database), so it runs in seconds
and the same cases every time. Schemathesis' coverage phase (each parameter's boundaries: the largest
integer, a string one past max_length, a missing required field) runs too, through its CLI with a fixed
seed. A bigger run by hand is `st run URL/openapi.json -H 'Authorization: Bearer …' --max-examples 150`.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from fleet.app import create_app
from fleet.settings import FleetSettings
from tests.fleet.conftest import Keys, serve

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES_PER_MODE = 12  # per operation and generation mode: ~22 operations × 2 modes × 12 cases


@dataclass(frozen=True)
class FuzzTarget:
    url: str
    headers: dict[str, str]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, keys: Keys) -> Iterator[FuzzTarget]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz-fleet")
    admin_token = "adm_" + secrets.token_urlsafe(24)
    settings_ = FleetSettings(data_dir=data_dir, db_url=f"sqlite:///{data_dir / 'fleet.db'}",
                              trusted_keys=[keys.trusted_public], admin_token=admin_token)
    with serve(create_app(settings_)) as url:
        yield FuzzTarget(url=url, headers={"Authorization": f"Bearer {admin_token}"})


def _fuzz_operation(operation, target: FuzzTarget, mode: GenerationMode, findings: list[str]) -> int:
    """Send `EXAMPLES_PER_MODE` generated requests; record each failed check instead of shrinking it."""
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        nonlocal sent
        sent += 1
        try:
            case.call_and_validate(base_url=target.url, headers=target.headers, checks=CHECKS, timeout=30)
        except (Failure, FailureGroup) as exc:
            failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
            for failure in failures:
                findings.append(f"{operation.label} [{mode.value}]: {failure.title}: "
                                f"{str(failure.message).splitlines()[0] if failure.message else ''} "
                                f"({case.as_curl_command(headers={'Authorization': '[token]'})})")

    try:
        run()
    except Unsatisfiable:
        # An operation without parameters or a body has no invalid request to make.
        if mode is not GenerationMode.NEGATIVE or sent:
            raise
    return sent


def test_fuzzing_the_live_openapi_finds_no_server_error_and_no_undocumented_status(fuzz_target: FuzzTarget) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_target.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    findings: list[str] = []

    sent = sum(_fuzz_operation(operation, fuzz_target, mode, findings)
               for operation in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))

    assert len(operations) >= 20 and sent >= len(operations) * 2  # every operation was exercised
    assert findings == []


def test_the_coverage_phase_finds_nothing_at_any_parameter_boundary(fuzz_target: FuzzTarget) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_target.url}/openapi.json", "--phases", "coverage",
         "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance", "--seed", "1",
         "--workers", "1", "--continue-on-failure", "--no-color",
         "-H", f"Authorization: {fuzz_target.headers['Authorization']}"],
        capture_output=True, text=True, timeout=300)
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)

    assert run.returncode == 0, run.stdout[-4000:]
    assert counts is not None and int(counts[1]) == int(counts[2]) >= 200, run.stdout[-2000:]


@pytest.mark.parametrize("path", [
    "/api/v1/alerts?before_id=-14898791120890986496",  # the 500 a fuzzing run found: an INTEGER overflow
    "/api/v1/alerts?before_id=9223372036854775808",
    "/api/v1/audit?before_id=2147483648",
    "/api/v1/alerts?limit=1001",
    "/api/v1/tokens/2147483648/revoke",
    "/api/v1/devices?selector=" + "a" * 4097,
    "/api/v1/devices/" + "d" * 129,
    "/api/v1/bundles/" + "0" * 65,
])
def test_out_of_range_parameters_are_a_422_not_a_server_error(fuzz_target: FuzzTarget, path: str) -> None:
    method = "POST" if path.endswith("/revoke") else "GET"
    response = httpx.request(method, fuzz_target.url + path, headers=fuzz_target.headers, timeout=30)

    assert response.status_code == 422, response.text


def test_a_body_over_the_limit_is_a_413(fuzz_target: FuzzTarget) -> None:
    from fleet.app import MAX_BODY_BYTES

    body = b'{"labels": {}, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = httpx.post(f"{fuzz_target.url}/api/v1/devices/enrollment-tokens", content=body,
                          headers={**fuzz_target.headers, "Content-Type": "application/json"}, timeout=30)
    chunked = httpx.post(f"{fuzz_target.url}/api/v1/devices/enrollment-tokens", content=iter([body[:1000], body[1000:]]),
                         headers={**fuzz_target.headers, "Content-Type": "application/json"}, timeout=30)

    assert (declared.status_code, declared.json()["error"]) == (413, "PayloadTooLarge")
    assert (chunked.status_code, chunked.json()["error"]) == (413, "PayloadTooLarge")


def test_every_route_documents_its_error_responses(fuzz_target: FuzzTarget) -> None:
    spec = httpx.get(f"{fuzz_target.url}/openapi.json", timeout=30).json()
    undocumented = []
    for path, operations in spec["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            codes = set(operation["responses"])
            wanted = {"401", "403"} if path != "/api/v1/devices/enroll" else {"400", "401", "403", "409"}
            if "requestBody" in operation or (method, path) == ("post", "/api/v1/bundles"):
                wanted.add("413")
            if not wanted <= codes:
                undocumented.append((method.upper(), path, sorted(wanted - codes)))
    assert undocumented == []
