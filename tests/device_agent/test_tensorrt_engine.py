"""The agent's TensorRT engine hook: spec parsing, cache keys, and the no-TensorRT path.

CI has no GPU: building and running a real engine is benchmarks/device/trt_check.py's job on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from builder.pipeline import BuildRequest, run_build
from device_agent.tensorrt_engine import (
    EngineSpec,
    build_engine,
    engine_cache_key,
    tensorrt_available,
)
from edgepack.bundle import open_bundle, read_manifest_unverified
from edgepack.errors import BundleError
from edgepack.signing import dev_key_path, load_public_key
from tests.support import REPO

SHA = "ab" * 32


@pytest.fixture
def jetson_bundle(tmp_path: Path) -> Path:
    """digits built for the jetson profile (runtime tensorrt), signed with the per-test dev key."""
    result = run_build(BuildRequest(config_path=REPO / "examples/digits/edgepack.yaml", profile="jetson", out_dir=tmp_path / "out"))
    assert result.exit_code == 0, result.report.selection_reason
    return next(p for p in result.outputs if p.suffix == ".edgepack")


@pytest.fixture
def jetson_model(jetson_bundle: Path, tmp_path: Path) -> tuple[Path, EngineSpec]:
    """The extracted ONNX of the jetson bundle and its parsed engine spec."""
    bundle = open_bundle(jetson_bundle, [load_public_key(dev_key_path().with_suffix(".pub"))])
    root = bundle.extract(tmp_path / "bundle")
    spec = EngineSpec.from_manifest(bundle.manifest.tensorrt)
    return root / spec.onnx_member, spec


def test_tensorrt_available_looks_without_importing():
    found = importlib.util.find_spec("tensorrt") is not None

    assert tensorrt_available() is found
    assert "tensorrt" not in sys.modules or found


def test_spec_the_builder_writes_for_jetson_parses(jetson_bundle: Path):
    manifest = read_manifest_unverified(jetson_bundle)

    spec = EngineSpec.from_manifest(manifest.tensorrt)

    assert manifest.runtime == "tensorrt"
    assert spec.onnx_member == manifest.model == "model/model.onnx"
    assert (spec.int8, spec.fp16) == (manifest.precision == "int8", manifest.precision in ("int8", "fp16"))
    assert spec.sparse_weights is manifest.tensorrt.sparse_tensor_cores
    assert spec.trtexec == manifest.tensorrt.trtexec
    assert "INT8" in spec.build_flags


def test_spec_flags_map_to_builder_flags():
    spec = EngineSpec.from_manifest({
        "build_on_device": True, "explicit_quantization": False, "sparse_tensor_cores": True,
        "trtexec": "trtexec --onnx=model/model.onnx --saveEngine=model.engine --fp16 --sparsity=enable --memPoolSize=workspace:256M",
    })

    assert (spec.fp16, spec.int8, spec.sparse_weights) == (True, False, True)
    assert spec.workspace_bytes == 256 << 20
    assert spec.build_flags == ("FP16", "SPARSE_WEIGHTS", f"workspace={256 << 20}")


GOOD = {"build_on_device": True, "explicit_quantization": True, "sparse_tensor_cores": False,
        "trtexec": "trtexec --onnx=model/model.onnx --saveEngine=model.engine --int8 --fp16", "doc": "ignored"}


@pytest.mark.parametrize(("change", "field"), [
    ({"trtexec": None}, "tensorrt.trtexec"),
    ({"build_on_device": "yes"}, "tensorrt.build_on_device"),
    ({"build_on_device": False}, "tensorrt.build_on_device"),
    ({"explicit_quantization": 1}, "tensorrt.explicit_quantization"),
    ({"explicit_quantization": False}, "tensorrt.explicit_quantization"),  # disagrees with --int8
    ({"sparse_tensor_cores": True}, "tensorrt.sparse_tensor_cores"),  # no --sparsity=enable
    ({"trtexec": "polygraphy --onnx=model/model.onnx"}, "tensorrt.trtexec"),
    ({"trtexec": "trtexec --saveEngine=model.engine --int8"}, "tensorrt.trtexec"),  # no --onnx
    ({"trtexec": "trtexec --onnx=../model.onnx --int8"}, "tensorrt.trtexec"),
    ({"trtexec": "trtexec --onnx=/abs/model.onnx --int8"}, "tensorrt.trtexec"),
    ({"trtexec": "trtexec --onnx=model/model.onnx --int8 --best"}, "tensorrt.trtexec"),  # unknown flag
    ({"trtexec": "trtexec --onnx='model/model.onnx --int8"}, "tensorrt.trtexec"),  # unbalanced quote
])
def test_malformed_spec_is_refused_naming_the_field(change: dict, field: str):
    with pytest.raises(BundleError) as caught:
        EngineSpec.from_manifest({**GOOD, **change})

    assert caught.value.field == field
    assert str(caught.value).startswith(field)


def test_missing_key_and_wrong_type_are_refused():
    missing = {k: v for k, v in GOOD.items() if k != "sparse_tensor_cores"}
    with pytest.raises(BundleError, match=r"^tensorrt\.sparse_tensor_cores: missing"):
        EngineSpec.from_manifest(missing)
    with pytest.raises(BundleError, match=r"^tensorrt: expected an object"):
        EngineSpec.from_manifest(["trtexec"])


def test_cache_key_is_deterministic():
    first = engine_cache_key(SHA, "8.6.2", "Orin (sm_87)", build_flags=("INT8", "FP16"))
    again = engine_cache_key(SHA, "8.6.2", "Orin (sm_87)", build_flags=("FP16", "INT8"))

    assert first == again
    assert len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize("changed", [
    (("cd" * 32, "8.6.2", "Orin (sm_87)"), ("INT8",)),
    ((SHA, "10.3.0", "Orin (sm_87)"), ("INT8",)),
    ((SHA, "8.6.2", "NVIDIA H100 80GB HBM3 (sm_90)"), ("INT8",)),
    ((SHA, "8.6.2", "Orin (sm_87)"), ("FP16",)),
])
def test_cache_key_changes_with_each_part(changed):
    base = engine_cache_key(SHA, "8.6.2", "Orin (sm_87)", build_flags=("INT8",))
    args, flags = changed

    assert engine_cache_key(*args, build_flags=flags) != base


def test_build_engine_without_tensorrt_returns_none_and_says_why(jetson_model, tmp_path: Path, caplog):
    # CI has no GPU and no tensorrt: this is the path every device without TensorRT takes.
    assert tensorrt_available() is False
    onnx_path, spec = jetson_model
    cache = tmp_path / "engines"

    with caplog.at_level(logging.INFO, logger="device_agent.tensorrt_engine"):
        result = build_engine(onnx_path, spec, cache)

    assert result is None
    assert "tensorrt is not importable" in caplog.text
    assert "onnxruntime" in caplog.text
    assert not cache.exists()


def test_agent_module_imports_stay_light():
    code = ("import sys, device_agent.tensorrt_engine; "
            "print(','.join(m for m in ('onnx', 'tensorrt', 'fastapi', 'tensorflow', 'onnxruntime', 'docker') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)

    assert done.stdout.strip() == ""


# Building and running a real engine needs a GPU with TensorRT: benchmarks/device/trt_check.py does that on
# the lent GPU machine; this suite runs where CI runs (no GPU).
