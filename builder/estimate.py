"""Estimated latency on the target from the profile's roofline performance model.

Per node: time = max(ops / (peak_ops[precision] * efficiency), bytes / bandwidth) + per-node overhead,
where ops (2 per multiply-accumulate) and bytes (weights + activations at the node's precision) are
counted from the statically shaped float graph. It is an estimate and always labelled so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from builder.onnx_utils import load_model

ESTIMATE_LABEL = "estimate: roofline model from the profile (ops and bytes counted from the graph)"
_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Nodes folded away or fused on every target runtime: they cost no separate kernel.
FREE_OPS = {"Constant", "Identity", "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "QuantizeLinear", "DequantizeLinear", "Cast", "Dropout"}


def _shapes(model: Any, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's static shape that shape inference finds. `input_shapes` fixes the graph inputs' dims
    first (a model whose dims stay dynamic on its target still has MACs: counted at the shape of the data)."""
    import onnx

    if input_shapes:
        model = _with_input_shapes(model, input_shapes)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=bool(input_shapes))
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
        elif value.type.tensor_type.HasField("shape") and not dims:
            shapes[value.name] = ()
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _with_input_shapes(model: Any, input_shapes: dict[str, tuple[int, ...]]) -> Any:
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        shape = input_shapes.get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    del fixed.graph.value_info[:]  # inferred again from the fixed inputs
    return fixed


def count_graph(model_path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """Per node: op type, name, MACs, weight elements and activation elements; dynamic input dims are
    counted at `input_shapes` when given."""
    model = load_model(model_path)
    shapes = _shapes(model, input_shapes)
    initializers = {init.name for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        out_shape = shapes.get(node.output[0]) if node.output else None
        out_elems = int(np.prod(out_shape)) if out_shape is not None else 0
        in_elems = sum(int(np.prod(shapes[i])) for i in node.input if i and i in shapes and i not in initializers)
        weight_elems = sum(int(np.prod(shapes[i])) for i in node.input if i in initializers)
        macs = 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in shapes:
            w = shapes[node.input[1]]
            per_output = int(np.prod(w[1:]))  # Conv: in/groups * kernel; ConvTranspose: out/groups * kernel
            if node.op_type == "Conv":
                macs = out_elems * per_output
            else:  # each input element meets out_channels/groups * kernel weights
                macs = int(np.prod(shapes.get(node.input[0], (0,)))) * per_output
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = shapes.get(node.input[0])
            if a:
                macs = out_elems * int(a[-1])
        nodes.append({"op_type": node.op_type, "name": node.name, "macs": macs, "weights": weight_elems,
                      "activations": in_elems + out_elems})
    return nodes


def cpu_peak_ops_per_s(profile: Any) -> dict[str, float]:
    """Peak ops/s of the board's CPU, derived from cores x clock x SIMD ops per cycle.

    Used for variants that run on the CPU of a board whose performance model describes its accelerator
    (onnxruntime on a Coral's Cortex-A53s, say). Ops per cycle per core: x86 AVX-512 64 fp32 (2 FMA
    units x 16 lanes x 2), AVX2 32; Arm NEON 16 on dual-pipe cores (those with dot-product or fp16
    arithmetic), else 8. INT8: x4 with VNNI or dot-product, else x2; FP16: x2 on Arm with fp16
    arithmetic, else as fp32 (converted).
    """
    features = set(profile.cpu.features)
    if profile.arch == "x86_64":
        fp32 = 64 if "avx512f" in features else 32 if "avx2" in features else 16
        int8 = fp32 * (4 if features & {"avx512_vnni", "avx_vnni"} else 2)
        fp16 = fp32
    else:
        fp32 = 16 if features & {"dotprod", "fp16", "asimdhp"} else 8
        int8 = fp32 * (4 if "dotprod" in features else 2)
        fp16 = fp32 * (2 if features & {"fp16", "asimdhp"} else 1)
    hz = profile.cpu.cores * profile.cpu.max_freq_ghz * 1e9
    return {"fp32": fp32 * hz, "fp16": fp16 * hz, "int8": int8 * hz}


def estimate_latency_ms(nodes: list[dict[str, Any]], profile: Any, precision: str, float_nodes: set[str] = frozenset(),
                        on_accelerator: bool = True) -> float:
    """Estimated single-inference latency on the target for a variant of `precision`.

    `on_accelerator=False` models a variant that runs on the board's CPU although the profile's
    performance model describes its accelerator.
    """
    perf = profile.performance
    peaks = perf.peak_ops_per_s if (on_accelerator or not profile.accelerators) else cpu_peak_ops_per_s(profile)
    bandwidth = perf.memory_bandwidth_gb_s * 1e9
    total_s = 0.0
    for node in nodes:
        if node["op_type"] in FREE_OPS:
            continue
        node_precision = precision
        if precision == "int8" and (node["op_type"] not in COMPUTE_OPS or node["name"] in float_nodes):
            # Non-compute ops run on dequantized values; fallback nodes stay float.
            node_precision = "fp16" if "fp16" in peaks and profile.accelerators else "fp32"
        if node_precision not in peaks:
            node_precision = "fp32" if "fp32" in peaks else next(iter(peaks))
        ops = 2.0 * node["macs"]
        width = _BYTES[node_precision]
        moved = (node["weights"] + node["activations"]) * width
        compute_s = ops / (peaks[node_precision] * perf.efficiency) if ops else 0.0
        total_s += max(compute_s, moved / bandwidth) + perf.per_node_overhead_us * 1e-6
    return round(total_s * 1000.0, 4)
