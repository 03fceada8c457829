"""Sample build reports and matrices for the page tests, shaped like what the builder writes.

`sample_report()` and `sample_matrix()` validate as `edgepack.report.BuildReport` / `BuildMatrix`, so the
pages are checked against the typed contract; tests that need a partial or malformed report edit a copy.
"""

from __future__ import annotations

from typing import Any

HOSTILE = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=1\">"


def variant(name: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "name": name, "precision": name, "format": "onnx", "runtime": "onnxruntime", "verified_in": "onnxruntime",
        "size_bytes": 180_000, "model_sha256": "f" * 64, "metric": "top1", "accuracy": 0.983, "agreement": 1.0,
        "cosine": 1.0, "max_abs_error": 0.0, "mean_abs_error": 0.0,
        "latency_ms": {"p50": 0.21, "p95": 0.26, "mean": 0.22, "runs": 100, "threads": 1}, "latency_cached": False,
        "estimated_target_latency_ms": 0.09, "target_latency_ms": 0.09, "target_latency_p95_ms": 0.1,
        "target_latency_source": "estimate", "fallback_nodes": [], "sparsity": None, "quantization": None,
        "runnable": True, "notes": [], "accuracy_delta": 0.0, "size_ratio": 1.0, "latency_ratio": 1.0,
        "failed_gates": [], "passed": True, "decision": "kept as a candidate",
    }
    base.update(overrides)
    return base


def sample_report() -> dict[str, Any]:
    """A realistic report: three variants, int8 selected, one variant failing a gate."""
    return {
        "schema_version": 1, "name": "digits-cnn", "version": "1.0.0", "profile": "jetson-orin-nano",
        "profile_description": "NVIDIA Jetson Orin Nano 8 GB, Ampere GPU with 32 tensor cores, 6-core Cortex-A78AE",
        "runtime": "onnxruntime", "runtimes": ["onnxruntime"], "created_by": "edgepack 0.1.0",
        "host": {"machine": "x86_64", "cpu": "AMD EPYC 7763 64-Core Processor", "cpu_features": ["avx2", "fma", "avx512f", "avx512_vnni"],
                 "is_target": False, "reason": "profile targets aarch64; host is x86_64"},
        "metric": "top1", "selected": "int8",
        "selection_reason": "int8: smallest and fastest on target among 2 passing variants (0.28× the size of fp32, "
                            "accuracy −0.30 pt within the 0.50 pt budget).",
        "gates": {"max_accuracy_drop": 0.005, "max_p95_latency_ms": None, "max_size_mb": 0.15, "min_agreement": None, "passed": True},
        "reference": {"name": "fp32", "accuracy": 0.983, "size_bytes": 180_400, "validation_samples": 360},
        "variants": [
            variant("fp32", size_bytes=180_400, failed_gates=[{"gate": "max_size_mb", "value": 0.1804, "threshold": 0.15,
                                                                "message": "size 0.18 MB > 0.15 MB"}], passed=False,
                    latency_cached=True, decision="dropped: fails max_size_mb"),
            variant("fp16", size_bytes=92_300, size_ratio=0.51, accuracy=0.983, accuracy_delta=0.0, agreement=1.0, cosine=0.99999,
                    max_abs_error=0.0021, latency_ms={"p50": 0.34, "p95": 0.41, "mean": 0.35, "runs": 100, "threads": 1},
                    latency_ratio=1.62, estimated_target_latency_ms=0.05, target_latency_ms=0.05,
                    notes=["fp16 runs through casts on this host CPU; the target has native fp16"]),
            variant("int8", size_bytes=50_100, size_ratio=0.28, accuracy=0.98, accuracy_delta=-0.003, agreement=0.995,
                    cosine=0.9991, max_abs_error=0.2, latency_ms={"p50": 0.5, "p95": 0.62, "mean": 0.52, "runs": 100, "threads": 1},
                    latency_ratio=2.4, estimated_target_latency_ms=0.012, target_latency_ms=0.012, fallback_nodes=["conv1"],
                    quantization={"activation_type": "int8", "weight_type": "int8", "per_channel": True, "reduce_range": False,
                                  "calibration": "minmax", "symmetric_activations": True,
                                  "reason": "the target's tensor cores run symmetric int8 activations"},
                    notes=["INT8 is 2.4x slower and 1.24x larger than fp32 on this host"], decision="selected"),
        ],
        "notes": ["Latency on the target is estimated: the build host is not the target.",
                  "fp32 kept as the reference; it fails max_size_mb."],
        "passes": [{"name": "check", "pass": "check", "seconds": 0.1, "cached": False},
                   {"name": "fp16", "pass": "fp16", "seconds": 0.8, "cached": True},
                   {"name": "quantize_int8", "pass": "int8-static", "seconds": 3.9, "cached": False},
                   {"name": "verify", "pass": "verify", "seconds": 5.2, "cached": False},
                   {"name": "benchmark", "pass": "benchmark", "seconds": 2.1, "cached": False}],
        "sensitivity": {"int8": [{"node": "fc2", "op_type": "Gemm", "macs": 640, "score": 0.0008},
                                 {"node": "conv1", "op_type": "Conv", "macs": 5184, "score": 0.012},
                                 {"node": "conv2", "op_type": "Conv", "macs": 9216, "score": 0.004}]},
        "estimate_label": "estimated from host timing and the profile's performance model",
        "lineage": {"source_model_sha256": "a" * 64, "calibration_sha256": "b" * 64, "validation_sha256": "c" * 64,
                    "config_sha256": "d" * 64, "profile_sha256": "9" * 64, "tools": {"onnxruntime": "1.18.0", "onnx": "1.16.1"}},
        "source_model": {"path": "examples/digits/model.onnx", "sha256": "a" * 64, "opset": 13},
        "bundle": {"path": "dist/digits-cnn-1.0.0-jetson-orin-nano.edgepack", "sha256": "e" * 64, "size_bytes": 61_234},
        "cache": {"hits": 1, "misses": 4, "enabled": True},
        "duration_s": 12.3,
    }


def matrix_variant(name: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "name": name, "runtime": "onnxruntime", "format": "onnx", "precision": name, "accuracy": 0.983,
        "accuracy_delta": 0.0, "size_bytes": 180_400, "host_p50_ms": 0.0261, "estimated_target_latency_ms": 0.152,
        "target_latency_ms": 0.152, "target_latency_source": "estimate", "passed": True, "verified_in": "onnxruntime",
        "why_not": None,
    }
    base.update(overrides)
    return base


def sample_matrix() -> dict[str, Any]:
    """Two profiles that built (one with a failing variant) and one that stopped early."""
    return {
        "schema_version": 1, "name": "digits-cnn", "version": "1.0.0", "metric": "top1", "exit_code": 2,
        "profiles": [
            {"profile": "jetson-orin-nano", "exit_code": 0, "error": None, "selected": "int8",
             "selection_reason": "int8: fastest on the target", "runtime": "tensorrt",
             "bundle": {"path": "dist/digits-cnn-1.0.0-jetson-orin-nano.edgepack", "sha256": "e" * 64, "size_bytes": 61_234},
             "variants": [matrix_variant("fp32", runtime="tensorrt"),
                          matrix_variant("fp16", runtime="tensorrt", size_bytes=138_700, target_latency_ms=0.138),
                          matrix_variant("int8", runtime="tensorrt", size_bytes=79_900, accuracy_delta=-0.0028,
                                         host_p50_ms=0.0326, target_latency_ms=0.137)],
             "notes": []},
            {"profile": "rpi4", "exit_code": 0, "error": None, "selected": "tflite-dynamic-int8",
             "selection_reason": "tflite-dynamic-int8: smallest", "runtime": "tflite", "bundle": None,
             "variants": [matrix_variant("tflite-fp32", runtime="tflite", format="tflite", precision="fp32", size_bytes=276_500),
                          matrix_variant("tflite-dynamic-int8", runtime="tflite", format="tflite", precision="int8",
                                         size_bytes=75_400, host_p50_ms=0.012, target_latency_ms=0.191),
                          matrix_variant("int8", precision="int8", size_bytes=78_300, accuracy_delta=-0.0125, passed=False,
                                         why_not="accuracy drop 1.25 pt > 0.50 pt")],
             "notes": []},
            {"profile": "coral-devboard", "exit_code": 2, "error": "op Softmax is not supported by the Edge TPU compiler",
             "selected": None, "variants": []},
        ],
    }
