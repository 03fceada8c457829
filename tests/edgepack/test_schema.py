"""`edgepack schema KIND` prints draft 2020-12 JSON Schemas that validate what edgepack writes and sends,
checked with the `jsonschema` package (an implementation that is not pydantic). The all-profiles check
lives in tests/e2e/test_all_profiles.py, beside the build it reuses."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import jsonschema
import pytest

from edgepack.histogram import LatencyHistogram
from edgepack.protocol import BundleRef, DesiredState, DeviceStatus, Telemetry, encode
from edgepack.schemas import CONTRACTS, DIALECT
from edgepack.signing import generate_keypair
from tests.support import REPO, run_cli

SHA = "cd" * 32


def schema_from_cli(kind: str) -> dict:
    result = run_cli("schema", kind)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def jetson_dist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jetson")
    private, _ = generate_keypair(root / "keys")
    env = {"XDG_CONFIG_HOME": str(root / "config"), "EDGEPACK_CACHE_DIR": str(root / "cache")}
    result = run_cli("build", "--profile", "jetson", "--config", str(REPO / "examples/digits/edgepack.yaml"),
                     "--out", str(root / "dist"), "--signing-key", str(private), "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "dist"


@pytest.mark.parametrize("kind", sorted(CONTRACTS))
def test_every_schema_is_a_draft_2020_12_schema_naming_its_contract(kind):
    schema = schema_from_cli(kind)

    validator(schema)
    assert schema["$schema"] == DIALECT
    assert schema["$id"] == f"urn:edgepack:{kind}:1"
    assert schema["type"] == "object" and schema["title"]


def test_the_manifest_schema_validates_a_built_manifest_and_refuses_a_missing_field(jetson_dist):
    check = validator(schema_from_cli("manifest"))
    with tarfile.open(next(jetson_dist.glob("*.edgepack"))) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        selftest = json.loads(tar.extractfile("selftest/cases.json").read())

    assert list(check.iter_errors(manifest)) == []
    del manifest["io"]["inputs"]
    assert [error.message for error in check.iter_errors(manifest)] == ["'inputs' is a required property"]
    assert list(validator(schema_from_cli("selftest")).iter_errors(selftest)) == []


def test_the_manifest_schema_refuses_unknown_fields_and_bad_hashes(jetson_dist):
    check = validator(schema_from_cli("manifest"))
    with tarfile.open(next(jetson_dist.glob("*.edgepack"))) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())

    manifest["latency_ms"] = {"p50": 1.0}
    manifest["files"]["model/model.onnx"]["sha256"] = "XYZ"

    messages = sorted(error.message for error in check.iter_errors(manifest))
    assert len(messages) == 2
    assert "Additional properties are not allowed ('latency_ms' was unexpected)" in messages
    assert any("does not match" in message for message in messages)


def test_the_report_schema_validates_a_build_report(jetson_dist):
    report = json.loads(next(jetson_dist.glob("*.report.json")).read_text())

    check = validator(schema_from_cli("report"))

    assert list(check.iter_errors(report)) == []
    report["variants"][0].pop("accuracy")
    assert [error.message for error in check.iter_errors(report)] == ["'accuracy' is a required property"]


def test_the_protocol_schemas_validate_messages_as_sent():
    histogram = LatencyHistogram()
    for value in (0.4, 0.5, 2.0):
        histogram.add(value)
    ref = BundleRef(id=SHA, name="digits", version="1.0.0", profile="rpi4", sha256=SHA, size=10, url="/api/v1/bundles/x")
    messages = {
        "desired": DesiredState(rollout_id="r1", seq=3, action="install", bundle=ref, issued_at=1.7e9),
        "status": DeviceStatus(device_id="dev-1", seq=3, phase="active", current_bundle=SHA, error=None, ts=1.7e9),
        "telemetry": Telemetry(device_id="dev-1", bundle_id=SHA, window_s=10, inferences=3, errors=0,
                               latency_ms=histogram.summary(),
                               drift={"input": 0.01}, ts=1.7e9),
    }
    for kind, message in messages.items():
        check = validator(schema_from_cli(kind))
        sent = json.loads(encode(message))
        assert list(check.iter_errors(sent)) == [], kind

    wrong = json.loads(encode(messages["telemetry"]))
    wrong["inferences"] = -1
    assert [error.message for error in validator(schema_from_cli("telemetry")).iter_errors(wrong)] == [
        "-1 is less than the minimum of 0"]
