"""Fix input shapes to static values (from the config, else from the data) and re-infer shapes."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from builder.onnx_utils import graph_inputs, load_model, save_model
from builder.op_support import check_loads_in_onnxruntime
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import ModelError


class StaticShapesConfig(PassConfig):
    shapes: dict[str, tuple[int, ...]] = Field(description="Static shape per input name.")


class StaticShapes(Pass):
    name = "static-shapes"
    description = "Make every input shape static so quantization, estimates and static-shape runtimes work."
    Config = StaticShapesConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
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
        # Stale intermediate shapes would contradict the new static ones; the runtime infers them again.
        # (onnx's own inference is not run here: it mis-infers some control-flow subgraphs, e.g. Silero VAD's If.)
        del model.graph.value_info[:]
        output = save_model(model, ctx.scratch("static.onnx"))
        try:
            check_loads_in_onnxruntime(output, optimize=True)
        except ModelError as exc:
            fixed = ", ".join(f"{k}: {v}" for k, v in changed.items())
            raise ModelError(
                f"the model does not accept the static input shapes {{{fixed}}}: {exc.message}"
            ) from None
        return PassOutput(model_path=output, info={"shapes": changed, "nodes_named": named})
