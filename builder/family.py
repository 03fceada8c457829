"""What kind of network a graph is, so INT8 starts from a recipe known to work for its kind.

    transformer   MatMuls with weights, Softmax and a layer norm (LayerNormalization, or the ReduceMean
                  pattern older exporters write): BERT/MiniLM encoders, ViT, Whisper's encoder
    recurrent     LSTM, GRU or RNN nodes: CRNN text recognisers, speech models
    embedding     an integer graph input that indexes a weight table (Gather): token or byte models
    conv          Conv/ConvTranspose carry most of the compute: classifiers, detectors
    other         none of these

The first that matches wins, in this order (a transformer reads tokens through an embedding too).

The recipes (`int8_recipe`):
  - transformer: quantize only MatMul/Gemm whose second input is a weight (MatMulConstBOnly), per channel.
    Softmax, LayerNorm, GELU and the attention's activation-by-activation MatMuls stay float: their
    ranges (a softmax's outputs crowd near 0, the attention mask adds -3.4e38) are what INT8 loses most
    on (MiniLM: every-op static INT8 lost 0.47 cosine). Dynamic INT8 of the same MatMuls is tried too,
    and the embedding tables are quantized with it when they are most of the weights.
  - the others keep the defaults (compute ops and the ops onnxruntime keeps in INT8 between them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from builder.onnx_utils import load_model

TRANSFORMER_OP_TYPES = ("MatMul", "Gemm")
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # transformer | recurrent | embedding | conv | other
    reason: str  # what in the graph says so
    embedding_share: float = 0.0  # the weight tables an integer input indexes, as a share of all weights

    def int8_recipe(self) -> dict[str, Any]:
        """Int8StaticConfig fields the family starts from (empty: the defaults)."""
        if self.name == "transformer":
            return {"op_types": list(TRANSFORMER_OP_TYPES), "matmul_const_b_only": True}
        return {}

    def to_dict(self) -> dict[str, Any]:
        recipe = self.int8_recipe()
        return {"name": self.name, "reason": self.reason, "embedding_share": round(self.embedding_share, 3),
                "int8_recipe": recipe or "default"}


def detect_family(model_path: Path, graph_counts: list[dict[str, Any]] | None = None) -> Family:
    """The family of the (simplified, float) model at `model_path`; `graph_counts` (builder.estimate's)
    weigh the compute when given."""
    model = load_model(model_path)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    op_set = {node.op_type for node in _all_nodes(graph)}  # subgraphs too: Silero keeps its LSTM inside an If
    sizes = {name: _elements(init) for name, init in weights.items()}
    total_weights = sum(sizes.values()) or 1
    integer_inputs = {value.name for value in graph.input
                      if value.type.tensor_type.elem_type in (6, 7)}  # int32, int64
    producers = {output: node for node in graph.node for output in node.output}
    tables = {node.input[0] for node in graph.node
              if node.op_type == "Gather" and node.input[0] in weights and _reads(node.input[1], integer_inputs, producers)}
    embedding_share = sum(sizes[name] for name in tables) / total_weights
    weight_matmuls = sum(1 for node in graph.node
                         if node.op_type in TRANSFORMER_OP_TYPES and len(node.input) > 1 and node.input[1] in weights)
    has_norm = "LayerNormalization" in op_set or ("ReduceMean" in op_set and ("Sqrt" in op_set or "Pow" in op_set))
    macs = sum(n["macs"] for n in graph_counts or []) or 0
    matmul_share = (sum(n["macs"] for n in graph_counts if n["op_type"] in TRANSFORMER_OP_TYPES) / macs) if macs else None
    # A conv backbone with a few attention blocks (PP-OCRv4 rec's SVTR neck: 6 % of its MACs in MatMuls) is
    # a conv net to the quantizer: quantizing only its MatMuls would leave nearly all of it float.
    if "Softmax" in op_set and has_norm and weight_matmuls >= 4 and (matmul_share is None or matmul_share >= 0.5):
        return Family("transformer", f"{weight_matmuls} weight MatMul/Gemm, Softmax and layer norms", embedding_share)
    recurrent = sorted(op_set & RECURRENT_OPS)
    if recurrent:
        return Family("recurrent", f"{', '.join(recurrent)} nodes", embedding_share)
    if tables:
        return Family("embedding", f"an integer input indexes {len(tables)} weight table(s) "
                                   f"({embedding_share:.0%} of the weights)", embedding_share)
    if graph_counts:
        macs = sum(n["macs"] for n in graph_counts) or 1
        conv = sum(n["macs"] for n in graph_counts if n["op_type"] in ("Conv", "ConvTranspose"))
        if conv / macs >= 0.5:
            return Family("conv", f"Conv carries {conv / macs:.0%} of the MACs", embedding_share)
    elif "Conv" in op_set:
        return Family("conv", "Conv nodes", embedding_share)
    return Family("other", "no transformer, recurrent, embedding or conv pattern", embedding_share)


def _all_nodes(graph: Any) -> list[Any]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                nodes += _all_nodes(sub)
    return nodes


def _elements(init: Any) -> int:
    count = 1
    for dim in init.dims:
        count *= int(dim)
    return count


def _reads(name: str, sources: set[str], producers: dict[str, Any], depth: int = 4) -> bool:
    """Whether tensor `name` is one of `sources` or made from one within a few nodes (Cast, Unsqueeze…)."""
    if name in sources:
        return True
    producer = producers.get(name)
    return depth > 0 and producer is not None and any(_reads(i, sources, producers, depth - 1) for i in producer.input if i)


__all__ = ["Family", "TRANSFORMER_OP_TYPES", "detect_family"]
