"""TensorRT's ONNX op support, as data (`builder/data/tensorrt_onnx_ops.yaml`), and the check against it.

Besides op names it checks the one restriction explicit quantization depends on: Q/DQ zero points of 0.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from builder.onnx_utils import load_model

DATA = Path(__file__).parent / "data" / "tensorrt_onnx_ops.yaml"


@lru_cache(maxsize=1)
def tensorrt_ops() -> frozenset[str]:
    data = yaml.safe_load(DATA.read_text())
    return frozenset(data["supported"])


def unsupported_tensorrt_ops(model_path: Path) -> list[tuple[str, str]]:
    """(op_type, node name) of every node TensorRT's ONNX parser does not support, in graph order."""
    from onnx import numpy_helper

    supported = tensorrt_ops()
    model = load_model(model_path)
    constants = {init.name: init for init in model.graph.initializer}
    problems = []
    for index, node in enumerate(model.graph.node):
        domain = node.domain or ""
        name = node.name or f"#{index}"
        if domain not in ("", "ai.onnx") or node.op_type not in supported:
            problems.append((node.op_type if not domain else f"{domain}.{node.op_type}", name))
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in constants:
            # TensorRT's explicit quantization takes symmetric INT8 only: every zero point must be 0.
            if numpy_helper.to_array(constants[node.input[2]]).any():
                problems.append((f"{node.op_type} with a non-zero zero point", name))
    return problems
