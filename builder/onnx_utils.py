"""Small helpers around onnx/onnxruntime shared by passes, verification and benchmarks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import ModelError
from edgepack.files import file_sha256

# ONNX TensorProto element types → numpy dtypes (the ones edge models use).
_ELEM_TO_NUMPY = {
    1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}


# builder.pipeline still imports the old name (its owner moves it to edgepack.files.file_sha256).
sha256_file = file_sha256


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def elem_type_to_numpy(elem_type: int) -> type:
    try:
        return _ELEM_TO_NUMPY[elem_type]
    except KeyError:
        raise ModelError(f"unsupported tensor element type {elem_type}") from None


def load_model(path: Path, *, load_external: bool = True) -> Any:
    """Load an ONNX model, turning protobuf/IO failures into a one-line ModelError."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=load_external)
    except FileNotFoundError:
        raise ModelError(f"model {path} does not exist") from None
    except Exception as exc:  # protobuf raises DecodeError and friends; all mean "not an ONNX model"
        raise ModelError(f"model {path} is not a readable ONNX file ({type(exc).__name__}: {str(exc)[:120] or 'truncated or corrupt'})") from None


def graph_inputs(model: Any) -> list[Any]:
    """Real inputs: graph inputs that are not initializers (old exporters list weights as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def value_info_shape(value_info: Any) -> list[int | str | None]:
    """Dims of a ValueInfo: ints for static dims, the symbolic name or None for dynamic ones."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def io_signature(model: Any) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of the model's inputs and outputs, JSON-ready."""

    def describe(values: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "dtype": np.dtype(elem_type_to_numpy(v.type.tensor_type.elem_type)).name,
                "shape": value_info_shape(v),
            }
            for v in values
        ]

    return {"inputs": describe(graph_inputs(model)), "outputs": describe(list(model.graph.output))}


def opset_version(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def make_session(path: Path, threads: int = 1, optimize: bool = True) -> Any:
    """A CPU onnxruntime session; model load failures become ModelError with the runtime's reason."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load {path.name}: {message[:300]}") from None


def tool_versions() -> dict[str, str]:
    """Versions of the tools whose behaviour decides a build's output (part of every cache key)."""
    import onnx
    import onnxruntime

    from edgepack import __version__

    return {"edgepack": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def save_model(model: Any, path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
