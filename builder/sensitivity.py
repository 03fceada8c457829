"""Per-node INT8 sensitivity: quantize one node at a time and measure the output error against fp32.

Calibration ranges are computed once and shared (the int8 pass caches them), so each trial costs one
Q/DQ rewrite and one pass over a validation subset. The ranking drives the accuracy fallback: the
most harmful nodes stay in float until the accuracy gate holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from builder.estimate import count_graph
from builder.passes.base import load_all_passes
from builder.passes.onnx.int8_static import COMPUTE_OP_TYPES
from builder.verify import Outputs, run_model
from edgepack.report import SensitivityEntry

if TYPE_CHECKING:
    from builder.context import BuildContext

MAX_CANDIDATES = 64
SUBSET = 64


def rank_nodes(ctx: BuildContext, base: Path, val_feeds: list[dict[str, np.ndarray]], reference: Outputs) -> list[SensitivityEntry]:
    op_types = set(ctx.plan.int8_config.get("op_types") or COMPUTE_OP_TYPES) & set(COMPUTE_OP_TYPES)
    nodes = [n for n in count_graph(base) if n["op_type"] in op_types]
    # The heaviest nodes first: if the cap bites, the cheap ones are the ones left unmeasured.
    nodes.sort(key=lambda n: -n["macs"])
    nodes = nodes[:MAX_CANDIDATES]
    feeds = val_feeds[:SUBSET]
    ref = {name: array[: len(feeds)] for name, array in reference.arrays.items()}
    int8 = load_all_passes()["int8-static"]
    ranking = []
    for measured, node in enumerate(nodes):
        if measured and ctx.budget_spent(f"sensitivity ranking after {measured} of {len(nodes)} nodes"):
            break  # the ranking so far still drives the fallback, over the nodes it measured
        pass_ = int8.from_dict({**ctx.plan.int8_config, "only_nodes": [node["name"]]})
        out = ctx.run_pass(pass_, base, label=f"sensitivity {node['name']}", quiet=True)
        outputs = run_model(out.model_path, feeds)
        score = float(np.mean([
            np.abs(outputs.arrays[name] - ref[name]).mean() / (np.abs(ref[name]).mean() + 1e-12) for name in ref
        ]))
        ranking.append(SensitivityEntry(node=node["name"], op_type=node["op_type"], macs=node["macs"], score=round(score, 8)))
    ranking.sort(key=lambda entry: (-entry.score, entry.node))
    return ranking
