"""Assemble and sign the bundle of the selected variant (DESIGN.md "The bundle").

Only deterministic facts go into the bundle (hashes, accuracy, sizes, the latency *estimate*), never
wall-clock measurements, so identical inputs give a byte-identical `.edgepack`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from builder.onnx_utils import io_signature, load_model
from builder.sbom import make_sbom
from edgepack.bundle import canonical_json, write_bundle
from edgepack.report import BuildReport, Variant

# Relative tolerance of the self-test per precision: a device's kernels may round differently.
SELFTEST_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 8e-2}
MANIFEST_METRICS = ("metric", "accuracy", "accuracy_delta", "agreement", "cosine", "max_abs_error", "mean_abs_error",
                    "size_bytes", "size_ratio", "estimated_target_latency_ms", "fallback_nodes", "sparsity")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def package_bundle(*, bundle_path: Path, candidate: Any, base_model: Path, variant: Variant, report: BuildReport, profile: Any,
                   runtime: Any, val_feeds: list[dict[str, np.ndarray]], outputs: Any, stats: dict[str, Any],
                   config: Any, tools: dict[str, str], private_key: Any):
    # The io signature is the ONNX one: every runtime adapter takes and returns these names and float
    # dtypes; a runtime with integer IO (Edge TPU) declares its quantization under io_quantization.
    signature = io_signature(load_model(base_model))
    if candidate.format == "onnx":
        signature = io_signature(load_model(candidate.model_path))
    model_sha = candidate.sha256()
    members: dict[str, Any] = {member: path.read_bytes() for member, path in candidate.files.items()}

    members["reference/stats.json"] = canonical_json(stats)

    count = min(config.verify.selftest_samples, len(val_feeds))
    rel = SELFTEST_TOLERANCE[variant.precision]
    output_names = [o["name"] for o in signature["outputs"]]
    cases = []
    for index in range(count):
        case: dict[str, Any] = {"inputs": {}, "outputs": {}}
        for position, (name, value) in enumerate(sorted(val_feeds[index].items())):
            member = f"selftest/{index}/in{position}.npy"
            members[member] = _npy(value)
            case["inputs"][name] = member
        for position, name in enumerate(output_names):
            member = f"selftest/{index}/out{position}.npy"
            expected = outputs.arrays[name][index].astype(np.float32)
            members[member] = _npy(expected)
            case["outputs"][name] = member
        cases.append(case)
    scale = max(float(np.abs(outputs.arrays[n][:count]).max()) for n in output_names) if count else 1.0
    selftest = {
        "schema_version": 1,
        "runtime": candidate.runtime,
        "tolerance": {"atol": round(max(1e-5, rel * max(scale, 1e-6)), 8), "rtol": rel,
                      "doc": "|actual - expected| <= atol + rtol * |expected|, elementwise"},
        "cases": cases,
    }
    members["selftest/cases.json"] = canonical_json(selftest)
    members["sbom.cdx.json"] = canonical_json(make_sbom(config.name, config.version, model_sha, candidate.runtime, tools))

    manifest = {
        "schema_version": 1,
        "name": config.name,
        "version": config.version,
        "profile": profile.name,
        "profile_aliases": list(profile.aliases),
        "runtime": candidate.runtime,
        "execution_providers": list(runtime.execution_providers) if runtime is not None else [],
        "delegates": list(runtime.delegates) if runtime is not None else [],
        "devices": list(runtime.devices) if runtime is not None else [],
        "precision": variant.precision,
        "variant": variant.name,
        "model": candidate.model_member,
        "model_files": sorted(candidate.files),
        "model_format": candidate.format,
        "io": signature,
        "selftest": "selftest/cases.json",
        "reference_stats": "reference/stats.json",
        "sbom": "sbom.cdx.json",
        "lineage": report.lineage.model_dump(mode="json"),
        "metrics": {key: getattr(variant, key) for key in MANIFEST_METRICS},
        "reference_metrics": {"accuracy": report.reference.accuracy, "size_bytes": report.reference.size_bytes},
        "gates": report.gates.model_dump(exclude={"passed"}),
        "envelope": {
            "estimated_target_latency_ms": variant.estimated_target_latency_ms,
            "latency_note": "estimate from the profile's performance model; fleet gates compare devices with a control cohort",
            "output_distribution": "reference/stats.json#outputs",
        },
        "quantization": variant.quantization,
        # Runtime sections only where the variant has them (a dump leaves out the absent ones).
        **variant.model_dump(mode="json", include={"tensorrt", "edgetpu", "io_quantization"}),
        "created_by": report.created_by,
    }
    return write_bundle(bundle_path, members, manifest, private_key)
