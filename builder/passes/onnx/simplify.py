"""Graph simplification: constant folding, redundant-node removal and Conv+BN fusion, offline.

Uses onnxruntime's own provider-independent (basic) graph optimizations and symbolic shape
inference, so the simplified model holds only standard ops and runs anywhere the float one did.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import Field

from builder.onnx_utils import load_model
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput


class SimplifyConfig(PassConfig):
    enabled: bool = Field(default=True, description="Run the simplification.")


class Simplify(Pass):
    name = "simplify"
    description = "Fold constants, drop redundant nodes and fuse Conv+BatchNorm with onnxruntime's basic optimizer."
    Config = SimplifyConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        if not self.config.enabled:
            return PassOutput(model_path=input_model, info={"skipped": True})
        import onnxruntime as ort

        before = load_model(input_model)
        output = ctx.scratch("simplified.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(output)
        # MatMulAddFusion turns a MatMul+Add on 3-D activations (every transformer layer) into Reshape-Gemm-
        # Reshape with shape constants it names itself; reloading the saved graph runs the same fusion again
        # and fails on those names ("Attempt to replace the existing tensor"). A quantizer also handles the
        # MatMul better than the reshaped Gemm, and the device's runtime fuses at load anyway.
        ort.InferenceSession(str(input_model), sess_options=options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["MatMulAddFusion"])
        after = load_model(output)
        grown = output.stat().st_size / max(1, input_model.stat().st_size)
        if grown > 1.10:
            # Constant folding can materialise shared or generated constants (Silero VAD grows 2.3 → 3.2 MB):
            # a bigger model is not simpler for a device, keep the original.
            return PassOutput(model_path=input_model, info={"skipped": True, "reason": f"the optimized graph was {grown:.2f}x larger; kept the original"})
        # Keep the producer of the source model visible for lineage; onnxruntime overwrites it.
        return PassOutput(
            model_path=output,
            info={
                "nodes_before": len(before.graph.node),
                "nodes_after": len(after.graph.node),
                "removed_ops": dict(sorted((Counter(n.op_type for n in before.graph.node) - Counter(n.op_type for n in after.graph.node)).items())),
            },
        )
