"""Load and check: the model parses, its opset fits the target, every op runs in the target runtime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import Field

from builder.onnx_utils import graph_inputs, io_signature, load_model, opset_version
from builder.op_support import check_loads_in_onnxruntime, check_ops_known
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import ModelError


class CheckConfig(PassConfig):
    runtime: str = Field(default="onnxruntime", description="Runtime whose op support is checked.")


class CheckModel(Pass):
    name = "check"
    description = "Parse the ONNX model, check opset and inputs, check every op against the target runtime."
    Config = CheckConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        import onnx

        model = load_model(input_model)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"model {input_model.name} is not valid ONNX: {str(exc).splitlines()[0][:200]}") from None
        opset = opset_version(model)
        if opset == 0:
            raise ModelError(f"model {input_model.name} declares no ai.onnx opset")
        if opset > ctx.profile.opset.max:
            raise ModelError(
                f"model opset {opset} is newer than profile {ctx.profile.name} accepts (max {ctx.profile.opset.max}); "
                "export the model with a lower opset"
            )
        if not graph_inputs(model):
            raise ModelError(f"model {input_model.name} has no inputs")
        check_ops_known(model, self.config.runtime)
        check_loads_in_onnxruntime(input_model)
        op_counts = Counter(node.op_type for node in model.graph.node)
        return PassOutput(
            model_path=input_model,
            info={
                "opset": opset,
                "producer": f"{model.producer_name} {model.producer_version}".strip(),
                "nodes": len(model.graph.node),
                "op_counts": dict(sorted(op_counts.items())),
                "io": io_signature(model),
            },
        )
