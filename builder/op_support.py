"""Which ops a target runtime can run, as data plus one real check in the runtime itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgepack.errors import ModelError, UnsupportedOpError

# Domains onnxruntime implements beyond the standard ONNX ops (contrib and ML ops).
ONNXRUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"}

_ORT_MISSING_KERNEL = re.compile(r"implementation for (?P<op>[\w.]+)\((?P<ver>\d+)\) node with name '(?P<node>[^']*)'")


def check_ops_known(model: Any, runtime: str) -> None:
    """Refuse ops that no schema or runtime domain knows, naming the op and the node."""
    import onnx

    for index, node in enumerate(_all_nodes(model.graph)):
        domain = node.domain or ""
        node_name = node.name or f"#{index}"
        if domain not in ONNXRUNTIME_DOMAINS:
            raise UnsupportedOpError(
                f"op {node.op_type!r} (domain {domain!r}) at node {node_name!r} is not supported by {runtime}",
                op_type=node.op_type, node_name=node_name, runtime=runtime,
            )
        if domain in ("", "ai.onnx", "ai.onnx.ml") and not onnx.defs.has(node.op_type, domain):
            raise UnsupportedOpError(
                f"op {node.op_type!r} at node {node_name!r} is not an ONNX op; {runtime} cannot run it",
                op_type=node.op_type, node_name=node_name, runtime=runtime,
            )


def check_loads_in_onnxruntime(model_path: Path, optimize: bool = False) -> None:
    """Create a real onnxruntime session; a missing kernel becomes an UnsupportedOpError naming the node."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Basic optimization runs shape inference through control-flow subgraphs, as the simplify pass will.
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc)
        match = _ORT_MISSING_KERNEL.search(text)
        if match:
            raise UnsupportedOpError(
                f"onnxruntime has no kernel for op {match['op']!r} (opset {match['ver']}) at node {match['node']!r}",
                op_type=match["op"], node_name=match["node"], runtime="onnxruntime",
            ) from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load the model: {first[:300]}") from None


def _all_nodes(graph: Any):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def has_subgraphs(model: Any) -> list[tuple[str, str]]:
    """(op_type, node name) of control-flow nodes (If/Loop/Scan) in the main graph."""
    return [(n.op_type, n.name) for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")]
