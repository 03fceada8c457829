"""JSON Schemas (draft 2020-12) of edgepack's contracts, for CI tooling and other languages.

    manifest    manifest.json of a bundle          edgepack.manifest.BundleManifest
    selftest    selftest/cases.json of a bundle    edgepack.manifest.SelftestSpec
    report      <name>-<version>-<profile>.report.json   edgepack.report.BuildReport
    telemetry   MQTT edgepack/v1/devices/{id}/telemetry  edgepack.protocol.Telemetry
    desired     MQTT edgepack/v1/devices/{id}/desired    edgepack.protocol.DesiredState
    status      MQTT edgepack/v1/devices/{id}/status     edgepack.protocol.DeviceStatus

Each schema is pydantic's validation-mode `model_json_schema()` of the model the code itself reads the
document with, so the two cannot disagree; `$schema` names the dialect and `$id` the contract and its
schema version. The models import only pydantic, so this works with the core install.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from pydantic import BaseModel

DIALECT = "https://json-schema.org/draft/2020-12/schema"


class Contract(NamedTuple):
    """Where a contract's model lives, and which schema version it describes."""

    module: str
    model: str
    version_attribute: str  # module attribute holding the contract's schema_version
    title: str


CONTRACTS: dict[str, Contract] = {
    "manifest": Contract("edgepack.manifest", "BundleManifest", "MANIFEST_SCHEMA_VERSION", "edgepack bundle manifest (manifest.json)"),
    "selftest": Contract("edgepack.manifest", "SelftestSpec", "SELFTEST_SCHEMA_VERSION", "edgepack bundle self-test (selftest/cases.json)"),
    "report": Contract("edgepack.report", "BuildReport", "REPORT_SCHEMA_VERSION", "edgepack build report (<name>-<version>-<profile>.report.json)"),
    "telemetry": Contract("edgepack.protocol", "Telemetry", "SCHEMA_VERSION", "edgepack MQTT telemetry message (protocol v1)"),
    "desired": Contract("edgepack.protocol", "DesiredState", "SCHEMA_VERSION", "edgepack MQTT desired state (protocol v1)"),
    "status": Contract("edgepack.protocol", "DeviceStatus", "SCHEMA_VERSION", "edgepack MQTT device status (protocol v1)"),
}


def contract_model(kind: str) -> type[BaseModel]:
    """The pydantic model of a contract (KeyError for an unknown kind)."""
    contract = CONTRACTS[kind]
    return getattr(importlib.import_module(contract.module), contract.model)


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of one contract: `manifest`, `selftest`, `report`, `telemetry`, `desired` or `status`."""
    contract = CONTRACTS[kind]
    version = getattr(importlib.import_module(contract.module), contract.version_attribute)
    schema = contract_model(kind).model_json_schema(mode="validation")
    return {"$schema": DIALECT, "$id": f"urn:edgepack:{kind}:{version}", **schema, "title": contract.title}


__all__ = ["CONTRACTS", "DIALECT", "Contract", "contract_model", "json_schema"]
