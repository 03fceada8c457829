"""A CycloneDX 1.5 SBOM listing the runtime packages a bundle needs. Deterministic: no timestamps."""

from __future__ import annotations

import uuid
from typing import Any

from edgepack import __version__


def runtime_components(runtime: str, tools: dict[str, str]) -> list[dict[str, Any]]:
    wanted = {"onnxruntime": ["onnxruntime", "numpy"], "openvino": ["openvino", "numpy"], "tflite": ["ai-edge-litert", "numpy"],
              "tensorrt": ["onnxruntime", "numpy"]}[runtime]
    components = []
    for package in wanted:
        version = tools.get(package, "")
        components.append({
            "type": "library", "bom-ref": f"pkg:pypi/{package}@{version}", "name": package, "version": version,
            "purl": f"pkg:pypi/{package}@{version}", "scope": "required",
            "description": "verified with this version on the build host",
        })
    return components


def make_sbom(name: str, version: str, model_sha256: str, runtime: str, tools: dict[str, str]) -> dict[str, Any]:
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"edgepack:{name}:{version}:{model_sha256}")
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            "tools": {"components": [{"type": "application", "name": "edgepack", "version": __version__}]},
            "component": {"type": "machine-learning-model", "bom-ref": f"model:{name}@{version}", "name": name,
                          "version": version, "hashes": [{"alg": "SHA-256", "content": model_sha256}]},
        },
        "components": runtime_components(runtime, tools),
        "dependencies": [{"ref": f"model:{name}@{version}", "dependsOn": [c["bom-ref"] for c in runtime_components(runtime, tools)]}],
    }
