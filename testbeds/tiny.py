"""A tiny real ONNX CNN and project folders for tests, written with onnx.helper (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml


def make_tiny_cnn(path: Path, opset: int = 11, seed: int = 0, extra_node=None) -> Path:
    """Conv(1→8) → Relu → Conv(8→16) → Relu → GlobalAveragePool → Flatten → Gemm(16→4), dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 16)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    if extra_node is not None:
        nodes.append(extra_node)
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])] if extra_node is None else
        [helper.make_tensor_value_info(extra_node.output[0], TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgepack-tests")
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def float_outputs(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": inputs[i : i + 1]})[0] for i in range(len(inputs))])



def write_config(project: Path, **changes) -> Path:
    path = project / "edgepack.yaml"
    config = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
