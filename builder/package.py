"""Assemble and sign the bundle of the selected variant (DESIGN.md "The bundle").

Only deterministic facts go into the bundle (hashes, accuracy, sizes, the latency *estimate*), never
wall-clock measurements, so identical inputs give a byte-identical `.edgepack`. The manifest is an
`edgepack.manifest.ManifestContent` built from the typed report; `write_bundle` adds the file table.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from builder.onnx_utils import io_signature, load_model
from builder.sbom import make_sbom
from edgepack.bundle import BundleInfo, canonical_json, write_bundle
from edgepack.manifest import (
    EdgeTpuPlacement,
    Envelope,
    IoSignature,
    ManifestContent,
    ManifestGates,
    ManifestMetrics,
    ReferenceMetrics,
    SelftestCase,
    SelftestSpec,
    SelftestTolerance,
)
from edgepack.report import BuildReport, Variant

# Relative tolerance of the self-test per precision: a device's kernels may round differently.
SELFTEST_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 8e-2}
SELFTEST_MEMBER = "selftest/cases.json"
REFERENCE_STATS_MEMBER = "reference/stats.json"
SBOM_MEMBER = "sbom.cdx.json"
LATENCY_NOTE = "estimate from the profile's performance model; fleet gates compare devices with a control cohort"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def selftest_members(*, signature: IoSignature, precision: str, runtime: str, val_feeds: list[dict[str, np.ndarray]],
                     outputs: Any, samples: int) -> tuple[SelftestSpec, dict[str, bytes]]:
    """The first `samples` validation inputs, the selected model's outputs for them, and the tolerance."""
    count = min(samples, len(val_feeds))
    rel = SELFTEST_TOLERANCE[precision]
    output_names = [tensor.name for tensor in signature.outputs]
    members: dict[str, bytes] = {}
    cases = []
    for index in range(count):
        inputs: dict[str, str] = {}
        for position, (name, value) in enumerate(sorted(val_feeds[index].items())):
            inputs[name] = f"selftest/{index}/in{position}.npy"
            members[inputs[name]] = _npy(value)
        expected: dict[str, str] = {}
        for position, name in enumerate(output_names):
            expected[name] = f"selftest/{index}/out{position}.npy"
            members[expected[name]] = _npy(outputs.arrays[name][index].astype(np.float32))
        cases.append(SelftestCase(inputs=inputs, outputs=expected))
    scale = max(float(np.abs(outputs.arrays[n][:count]).max()) for n in output_names) if count else 1.0
    tolerance = SelftestTolerance(atol=round(max(1e-5, rel * max(scale, 1e-6)), 8), rtol=rel,
                                  doc="|actual - expected| <= atol + rtol * |expected|, elementwise")
    return SelftestSpec(runtime=runtime, tolerance=tolerance, cases=cases), members


def manifest_content(*, candidate: Any, signature: IoSignature, variant: Variant, report: BuildReport, profile: Any,
                     runtime: Any, config: Any) -> ManifestContent:
    """What the manifest says about the selected variant (everything but the file table)."""
    return ManifestContent(
        name=config.name,
        version=config.version,
        profile=profile.name,
        profile_aliases=list(profile.aliases),
        runtime=candidate.runtime,
        execution_providers=list(runtime.execution_providers) if runtime is not None else [],
        delegates=list(runtime.delegates) if runtime is not None else [],
        devices=list(runtime.devices) if runtime is not None else [],
        precision=variant.precision,
        variant=variant.name,
        model=candidate.model_member,
        model_files=sorted(candidate.files),
        model_format=candidate.format,
        io=signature,
        selftest=SELFTEST_MEMBER,
        reference_stats=REFERENCE_STATS_MEMBER,
        sbom=SBOM_MEMBER,
        lineage=report.lineage,
        metrics=ManifestMetrics(**{key: getattr(variant, key) for key in ManifestMetrics.model_fields}),
        reference_metrics=ReferenceMetrics(accuracy=report.reference.accuracy, size_bytes=report.reference.size_bytes),
        gates=ManifestGates(**report.gates.model_dump(exclude={"passed"})),
        envelope=Envelope(estimated_target_latency_ms=variant.estimated_target_latency_ms, latency_note=LATENCY_NOTE,
                          output_distribution=f"{REFERENCE_STATS_MEMBER}#outputs"),
        quantization=variant.quantization,
        tensorrt=variant.tensorrt,
        edgetpu=EdgeTpuPlacement.model_validate(variant.edgetpu) if variant.edgetpu is not None else None,
        io_quantization=variant.io_quantization,
        created_by=report.created_by,
    )


def package_bundle(*, bundle_path: Path, candidate: Any, base_model: Path, variant: Variant, report: BuildReport, profile: Any,
                   runtime: Any, val_feeds: list[dict[str, np.ndarray]], outputs: Any, stats: dict[str, Any],
                   config: Any, tools: dict[str, str], private_key: Any) -> BundleInfo:
    # The io signature is the ONNX one: every runtime adapter takes and returns these names and float
    # dtypes; a runtime with integer IO (Edge TPU) declares its quantization under io_quantization.
    model_for_io = candidate.model_path if candidate.format == "onnx" else base_model
    signature = IoSignature.model_validate(io_signature(load_model(model_for_io)))
    members: dict[str, Any] = {member: path.read_bytes() for member, path in candidate.files.items()}
    members[REFERENCE_STATS_MEMBER] = canonical_json(stats)
    selftest, cases = selftest_members(signature=signature, precision=variant.precision, runtime=candidate.runtime,
                                       val_feeds=val_feeds, outputs=outputs, samples=config.verify.selftest_samples)
    members.update(cases)
    members[SELFTEST_MEMBER] = canonical_json(selftest.to_json_dict())
    members[SBOM_MEMBER] = canonical_json(make_sbom(config.name, config.version, candidate.sha256(), candidate.runtime, tools))
    content = manifest_content(candidate=candidate, signature=signature, variant=variant, report=report, profile=profile,
                               runtime=runtime, config=config)
    return write_bundle(bundle_path, members, content, private_key)
