"""LiteRT (the TFLite interpreter, `ai_edge_litert`) on the host CPU: the runtime of .tflite variants.

Feeds and outputs follow the ONNX model, as for every adapter. How a .tflite's tensors map to them
is read from `tflite_io.json` beside the file (written by the `tflite-convert` pass): which tensor
is which ONNX input/output, the transpose between layouts (outputs come back from TensorFlow's
channel-last layout) and the scale/zero-point of int8/uint8 tensors, which the adapter applies:
float feeds are quantized into integer inputs, integer outputs are dequantized. A .tflite without
that file is mapped by position, with a channel-last input transposed where only that shape fits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter  # at the top on purpose: a missing LiteRT fails get_adapter() as RuntimeUnavailable

from builder.latency import time_calls
from builder.verify import Outputs

IO_FILE = "tflite_io.json"
_INTEGER = ("int8", "uint8", "int16")


def _interpreter(model_path: Path, threads: int) -> Interpreter:
    interpreter = Interpreter(model_path=str(model_path), num_threads=threads if threads and threads > 0 else None)
    interpreter.allocate_tensors()
    return interpreter


def load_io(model_path: Path, interpreter: Any = None, feed: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The tensor map of a .tflite: from `tflite_io.json` beside it, else by position."""
    sidecar = model_path.parent / IO_FILE
    if sidecar.is_file():
        entries = json.loads(sidecar.read_text())
        if model_path.name in entries:
            return entries[model_path.name]
    if interpreter is None:
        interpreter = _interpreter(model_path, 1)
    names = list(feed) if feed else [d["name"] for d in interpreter.get_input_details()]

    def record(detail: dict[str, Any], name: str, transpose: list[int] | None, onnx_shape: list[int] | None) -> dict[str, Any]:
        dtype = np.dtype(detail["dtype"]).name
        scale, zero_point = detail["quantization"]
        return {"name": name, "tflite_name": detail["name"], "tflite_index": int(detail["index"]),
                "shape": [int(d) for d in detail["shape"]], "onnx_shape": onnx_shape, "dtype": dtype,
                "scale": float(scale) if dtype in _INTEGER else None,
                "zero_point": int(zero_point) if dtype in _INTEGER else None, "transpose": transpose}

    inputs = []
    for detail, name in zip(interpreter.get_input_details(), names):
        shape = [int(d) for d in detail["shape"]]
        given = list(np.shape(feed[name])) if feed else shape
        channel_last = [0, *range(2, len(given)), 1] if len(given) in (3, 4, 5) else None
        transpose = channel_last if given != shape and channel_last and [given[p] for p in channel_last] == shape else None
        inputs.append(record(detail, name, transpose, given))
    outputs = [record(d, d["name"], None, None) for d in interpreter.get_output_details()]
    return {"inputs": inputs, "outputs": outputs}


def quantize(value: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """A float array as the tensor's type: real = (q - zero_point) * scale for integer tensors."""
    dtype = np.dtype(spec["dtype"])
    if spec["dtype"] not in _INTEGER:
        return value.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    scale = spec["scale"] or 1.0
    return np.clip(np.round(value / scale + spec["zero_point"]), info.min, info.max).astype(dtype)


def dequantize(value: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    if spec["dtype"] not in _INTEGER:
        return value.astype(np.float64)
    return (value.astype(np.float64) - spec["zero_point"]) * (spec["scale"] or 1.0)


def _set_inputs(interpreter: Any, io: dict[str, Any], feed: dict[str, np.ndarray]) -> None:
    for spec in io["inputs"]:
        value = np.asarray(feed[spec["name"]], dtype=np.float32)
        if spec["transpose"]:
            value = value.transpose(spec["transpose"])
        interpreter.set_tensor(spec["tflite_index"], quantize(value.reshape(spec["shape"]), spec))


def _get_outputs(interpreter: Any, io: dict[str, Any]) -> list[np.ndarray]:
    arrays = []
    for spec in io["outputs"]:
        value = dequantize(interpreter.get_tensor(spec["tflite_index"]), spec)
        if spec["transpose"]:
            value = value.transpose(spec["transpose"])
        onnx_shape = spec.get("onnx_shape")
        if onnx_shape and None not in onnx_shape and int(np.prod(onnx_shape)) == value.size:
            value = value.reshape(onnx_shape)
        arrays.append(value)
    return arrays


class LiteRtAdapter:
    name = "tflite"

    def run(self, model_path: Path, feeds: list[dict[str, np.ndarray]]) -> Outputs:
        # One thread: the same model and feeds give the same outputs on every run.
        interpreter = _interpreter(model_path, 1)
        io = load_io(model_path, interpreter, feeds[0] if feeds else None)
        collected: dict[str, list[np.ndarray]] = {spec["name"]: [] for spec in io["outputs"]}
        for feed in feeds:
            _set_inputs(interpreter, io, feed)
            interpreter.invoke()
            for spec, value in zip(io["outputs"], _get_outputs(interpreter, io)):
                collected[spec["name"]].append(value)
        return Outputs({name: np.stack(values).astype(np.float64) for name, values in collected.items()})

    def invoke_once(self, model_path: Path, feed: dict[str, np.ndarray], io: dict[str, Any]) -> list[np.ndarray]:
        """Outputs of one feed under an explicit tensor map (the converter uses it to settle layouts)."""
        interpreter = _interpreter(model_path, 1)
        _set_inputs(interpreter, io, feed)
        interpreter.invoke()
        return _get_outputs(interpreter, io)

    def latency(self, model_path: Path, feed: dict[str, np.ndarray], warmup: int, runs: int, threads: int) -> dict[str, Any]:
        interpreter = _interpreter(model_path, threads)
        io = load_io(model_path, interpreter, feed)
        def call() -> None:
            _set_inputs(interpreter, io, feed)
            interpreter.invoke()
            _get_outputs(interpreter, io)

        return time_calls(call, warmup, runs, threads)

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"ai-edge-litert": version("ai-edge-litert")}
