"""A valid bundle manifest's content for tests that write bundles by hand (not through the builder)."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.bundle import canonical_json
from edgepack.signing import load_private_key, sign_manifest

_SHA = "ab" * 32

MANIFEST_CONTENT: dict[str, Any] = {
    "schema_version": 1,
    "name": "digits",
    "version": "1.2.0",
    "profile": "rpi4-cpu",
    "profile_aliases": ["rpi4"],
    "runtime": "onnxruntime",
    "execution_providers": ["CPUExecutionProvider"],
    "delegates": [],
    "devices": [],
    "precision": "int8",
    "variant": "int8",
    "model": "model/model.onnx",
    "model_files": ["model/model.onnx"],
    "model_format": "onnx",
    "io": {"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
           "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]},
    "selftest": "selftest/cases.json",
    "reference_stats": "reference/stats.json",
    "sbom": "sbom.cdx.json",
    "lineage": {"source_model_sha256": _SHA, "calibration_sha256": None, "validation_sha256": _SHA,
                "config_sha256": _SHA, "profile_sha256": _SHA, "tools": {"edgepack": "0.1.0", "note": "grüße"}},
    "metrics": {"metric": "top1", "accuracy": 0.975, "accuracy_delta": -0.0025, "agreement": 0.99, "cosine": 0.9999,
                "max_abs_error": 0.2, "mean_abs_error": 0.05, "size_bytes": 1024, "size_ratio": 0.25,
                "estimated_target_latency_ms": 0.5, "fallback_nodes": [], "sparsity": None},
    "reference_metrics": {"accuracy": 0.9775, "size_bytes": 4096},
    "gates": {"max_accuracy_drop": 0.005, "max_p95_latency_ms": None, "max_size_mb": 1.0, "min_agreement": None},
    "envelope": {"estimated_target_latency_ms": 0.5, "latency_note": "estimate", "output_distribution": "reference/stats.json#outputs"},
    "quantization": {"format": "QDQ", "per_channel": True},
    "created_by": "edgepack 0.1.0",
}


def manifest_content(**changes: Any) -> dict[str, Any]:
    """A fresh copy of MANIFEST_CONTENT with top-level keys replaced."""
    return {**copy.deepcopy(MANIFEST_CONTENT), **changes}


def resign_with_manifest(source: Path, dest: Path, private_key: Path, change: Callable[[dict], object]) -> dict:
    """Copy the bundle `source` to `dest` with its manifest JSON changed by `change` (which may break the
    manifest's shape) and signed again with `private_key`: a validly signed, possibly malformed bundle.
    Returns the changed manifest document."""
    with tarfile.open(source) as tar:
        entries = [(info, tar.extractfile(info).read() if info.isreg() else None) for info in tar.getmembers()]
    document = json.loads(dict((info.name, data) for info, data in entries)["manifest.json"])
    change(document)
    manifest_bytes = canonical_json(document)
    replaced = {"manifest.json": manifest_bytes,
                "manifest.sig": canonical_json(sign_manifest(manifest_bytes, load_private_key(private_key)))}
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            data = replaced.get(info.name, data)
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return document
