"""Fix input shapes to static values (from the config, else from the data) and re-infer shapes."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from builder.onnx_utils import graph_inputs, load_model, save_model
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import ModelError


class StaticShapesConfig(PassConfig):
    shapes: dict[str, tuple[int, ...]] = Field(description="Static shape per input name.")


class StaticShapes(Pass):
    name = "static-shapes"
    description = "Make every input shape static so quantization, estimates and static-shape runtimes work."
    Config = StaticShapesConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        import onnx

        model = load_model(input_model)
        inputs = {inp.name: inp for inp in graph_inputs(model)}
        unknown = sorted(set(self.config.shapes) - set(inputs))
        if unknown:
            raise ModelError(f"inputs {unknown} in the config are not model inputs (model inputs: {', '.join(inputs)})")
        changed = {}
        for name, value_info in inputs.items():
            if name not in self.config.shapes:
                continue
            shape = self.config.shapes[name]
            dims = value_info.type.tensor_type.shape.dim
            if len(dims) != len(shape):
                raise ModelError(f"input {name!r} has rank {len(dims)} but the static shape {list(shape)} has rank {len(shape)}")
            for dim, size in zip(dims, shape):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
                    raise ModelError(f"input {name!r}: static shape {list(shape)} conflicts with the model's fixed dim {dim.dim_value}")
                dim.Clear()
                dim.dim_value = int(size)
            changed[name] = list(shape)
        # Quantization excludes nodes by name and the report lists them: every node needs one.
        named = 0
        taken = {node.name for node in model.graph.node if node.name}
        for index, node in enumerate(model.graph.node):
            if not node.name:
                candidate = f"{node.op_type}_{index}"
                while candidate in taken:
                    candidate += "_"
                node.name = candidate
                taken.add(candidate)
                named += 1
        # Stale intermediate shapes would contradict the new static ones: drop and infer again.
        del model.graph.value_info[:]
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as exc:
            raise ModelError(f"shape inference failed with static input shapes {changed}: {str(exc)[:200]}") from None
        output = save_model(model, ctx.scratch("static.onnx"))
        return PassOutput(model_path=output, info={"shapes": changed, "nodes_named": named})
