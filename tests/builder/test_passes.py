"""Each pass on a tiny real model, run in real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from builder.data import load_build_data
from builder.passes.base import PASS_REGISTRY, PassContext, load_all_passes
from builder.passes.onnx.prune import prune_2_4
from edgepack.config import load_build_config
from edgepack.errors import ConfigError, ModelError, UnsupportedOpError
from hardware_profiles import load_profile
from testbeds.tiny import make_tiny_cnn

PASSES = load_all_passes()


def _ctx(tmp_path: Path, project: Path | None = None, profile: str = "x86-avx512-vnni") -> PassContext:
    data = None
    if project is not None:
        config = load_build_config(project / "edgepack.yaml")
        data = load_build_data(config.calibration_path, config.validation_path)
        data.input_shapes = {"input": (1, 1, 8, 8)}
    return PassContext(work_dir=tmp_path / "work", profile=load_profile(profile), build=None, data=data)


def _run(model_path: Path, feed: np.ndarray, *, graph_semantics: bool = False) -> np.ndarray:
    """The model's output in onnxruntime on this CPU. `graph_semantics`: with graph optimizations off, so a QDQ
    model runs as QuantizeLinear → DequantizeLinear → float ops, what the quantized graph means on any target,
    instead of this host's fused int8 kernels."""
    options = ort.SessionOptions()
    if graph_semantics:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": feed})[0]


def test_every_pass_registers_itself_with_a_config_and_description():
    assert {"check", "static-shapes", "opset-upgrade", "simplify", "fp16", "int8-static", "int8-dynamic", "prune"} <= set(PASS_REGISTRY)
    for name, cls in PASS_REGISTRY.items():
        assert cls.name == name and cls.description and cls.Config is not None


def test_a_bad_pass_config_is_one_line_naming_the_pass_and_field():
    with pytest.raises(ConfigError) as info:
        PASSES["int8-static"].from_dict({"calibration_method": "magic"})
    assert "int8-static" in str(info.value) and "calibration_method" in str(info.value)
    with pytest.raises(ConfigError, match="prune: <root>|prune: .*2:4"):
        PASSES["prune"].from_dict({"pattern": "2:4", "sparsity": 0.7})
    with pytest.raises(ConfigError, match="unknown field"):
        PASSES["fp16"].from_dict({"keep_io": True})


def test_check_names_the_unsupported_op_and_node(tmp_path):
    node = helper.make_node("FancyOp", ["logits"], ["out"], name="my_fancy_node", domain="com.example")
    model = make_tiny_cnn(tmp_path / "m.onnx", extra_node=node)
    m = onnx.load(str(model))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(m, str(model))
    with pytest.raises(UnsupportedOpError) as info:
        PASSES["check"].from_dict({}).run(model, _ctx(tmp_path))
    assert "FancyOp" in str(info.value) and "my_fancy_node" in str(info.value)
    assert info.value.node_name == "my_fancy_node"


def test_check_refuses_a_truncated_model(tmp_path):
    model = make_tiny_cnn(tmp_path / "m.onnx")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        PASSES["check"].from_dict({}).run(model, _ctx(tmp_path))


def test_opset_upgrade_to_13_keeps_outputs(tmp_path):
    model = make_tiny_cnn(tmp_path / "m.onnx", opset=11)
    out = PASSES["opset-upgrade"].from_dict({}).run(model, _ctx(tmp_path))
    assert out.info == {"from": 11, "to": 13, "changed": True}
    upgraded = onnx.load(str(out.model_path))
    assert [o.version for o in upgraded.opset_import if o.domain == ""] == [13]
    feed = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(out.model_path, feed), _run(model, feed), rtol=1e-5, atol=1e-6)


def test_static_shapes_fixes_dims_names_nodes_and_refuses_a_wrong_rank(tmp_path):
    model = make_tiny_cnn(tmp_path / "m.onnx")
    m = onnx.load(str(model))
    m.graph.node[1].name = ""
    onnx.save(m, str(model))
    out = PASSES["static-shapes"].from_dict({"shapes": {"input": [1, 1, 8, 8]}}).run(model, _ctx(tmp_path))
    fixed = onnx.load(str(out.model_path))
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 8, 8]
    assert all(n.name for n in fixed.graph.node) and out.info["nodes_named"] == 1
    with pytest.raises(ModelError, match="rank"):
        PASSES["static-shapes"].from_dict({"shapes": {"input": [1, 64]}}).run(model, _ctx(tmp_path))


def test_simplify_keeps_outputs(tmp_path):
    model = make_tiny_cnn(tmp_path / "m.onnx")
    out = PASSES["simplify"].from_dict({}).run(model, _ctx(tmp_path))
    feed = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(out.model_path, feed), _run(model, feed), rtol=1e-5, atol=1e-6)


def test_fp16_keeps_float32_io_and_halves_the_weights(tmp_path):
    model = make_tiny_cnn(tmp_path / "m.onnx", opset=13)
    out = PASSES["fp16"].from_dict({}).run(model, _ctx(tmp_path))
    converted = onnx.load(str(out.model_path))
    assert converted.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.data_type for i in converted.graph.initializer} == {onnx.TensorProto.FLOAT16}
    feed = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(out.model_path, feed), _run(model, feed), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("profile,activation,reduce_range", [
    ("x86-avx512-vnni", "uint8", False),
    ("x86-avx2", "uint8", True),
    ("rpi5", "int8", False),
    ("jetson", "int8", False),
])
def test_int8_static_qdq_scheme_follows_the_profile(tmp_path, tiny_project, profile, activation, reduce_range):
    model = make_tiny_cnn(tmp_path / "m.onnx", opset=13)
    out = PASSES["int8-static"].from_dict({}).run(model, _ctx(tmp_path, tiny_project, profile))
    q = out.info["quantization"]
    assert (q["activation_type"], q["reduce_range"], q["per_channel"], q["format"]) == (activation, reduce_range, True, "QDQ")
    assert q["reason"]
    assert out.info["quantized_nodes"] == 3
    quantized = onnx.load(str(out.model_path))
    ops = [n.op_type for n in quantized.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = {i.name: i for i in quantized.graph.initializer}
    # per-channel: the first conv's weight scale has one entry per output channel
    assert len(onnx.numpy_helper.to_array(weights["w1_scale"])) == 8
    feed = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    ref = _run(model, feed)
    # jetson's model runs in TensorRT, not here: check what its symmetric int8 graph computes, not onnxruntime's
    # x86 S8S8 kernels, which saturate on CPUs without VNNI (the CI machine) and are no part of that target
    out_values = _run(out.model_path, feed, graph_semantics=profile == "jetson")
    np.testing.assert_allclose(out_values, ref, atol=0.1 * np.abs(ref).max() + 1e-3)


def test_int8_static_excludes_fallback_nodes(tmp_path, tiny_project):
    model = make_tiny_cnn(tmp_path / "m.onnx", opset=13)
    out = PASSES["int8-static"].from_dict({"nodes_to_exclude": ["conv1"]}).run(model, _ctx(tmp_path, tiny_project))
    assert out.info["quantized_nodes"] == 2 and out.info["fallback_nodes"] == ["conv1"]


def test_int8_dynamic_quantizes_gemm_weights(tmp_path):
    model = make_tiny_cnn(tmp_path / "m.onnx", opset=13)
    out = PASSES["int8-dynamic"].from_dict({"op_types": ["MatMul", "Gemm"]}).run(model, _ctx(tmp_path))
    ops = [n.op_type for n in onnx.load(str(out.model_path)).graph.node]
    assert any(op in ops for op in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"))
    feed = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    ref = _run(model, feed)
    np.testing.assert_allclose(_run(out.model_path, feed), ref, atol=0.1 * np.abs(ref).max())


def test_prune_2_4_keeps_two_of_every_four_along_the_reduction_axis():
    weight = np.random.default_rng(0).normal(size=(16, 8, 3, 3)).astype(np.float32)
    pruned = prune_2_4(weight, reduction_axis=1)
    groups = np.moveaxis(pruned, 1, -1).reshape(-1, 4)
    assert np.all((groups != 0).sum(axis=1) == 2)
    # the kept ones are the two largest magnitudes of each group
    original = np.moveaxis(weight, 1, -1).reshape(-1, 4)
    kept = np.sort(np.abs(groups), axis=1)[:, 2:]
    np.testing.assert_allclose(kept, np.sort(np.abs(original), axis=1)[:, 2:])
    assert prune_2_4(np.ones((4, 3, 3, 3), np.float32), reduction_axis=1) is None


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_reports_the_achieved_sparsity(tmp_path, pattern):
    model = make_tiny_cnn(tmp_path / "m.onnx", opset=13)
    out = PASSES["prune"].from_dict({"pattern": pattern, "sparsity": 0.5}).run(model, _ctx(tmp_path))
    pruned = onnx.load(str(out.model_path))
    w2 = onnx.numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == "w2"))
    assert abs((w2 == 0).mean() - 0.5) < 0.01
    assert 0.4 < out.info["sparsity"] <= 0.5
    if pattern == "2:4":
        # conv1 has one input channel: not a multiple of 4, left dense and listed
        assert any(s.startswith("w1") for s in out.info["skipped_tensors"])


def test_tensorrt_check_flags_unsupported_ops_and_asymmetric_qdq(tmp_path, tiny_project):
    from builder.tensorrt_support import unsupported_tensorrt_ops

    model = make_tiny_cnn(tmp_path / "m.onnx", opset=13)
    assert unsupported_tensorrt_ops(model) == []
    # asymmetric uint8 activations (the x86 scheme) have non-zero zero points: TensorRT refuses them
    x86 = PASSES["int8-static"].from_dict({}).run(model, _ctx(tmp_path, tiny_project, "x86-avx512-vnni"))
    assert any("zero point" in op for op, _ in unsupported_tensorrt_ops(x86.model_path))
    jetson = PASSES["int8-static"].from_dict({}).run(model, _ctx(tmp_path / "j", tiny_project, "jetson"))
    assert unsupported_tensorrt_ops(jetson.model_path) == []
    node = helper.make_node("NonZero", ["logits"], ["out"], name="nz")
    odd = make_tiny_cnn(tmp_path / "odd.onnx", opset=13, extra_node=node)
    assert ("NonZero", "nz") in unsupported_tensorrt_ops(odd)
