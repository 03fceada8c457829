"""Runtime adapters: load an installed bundle's model into the runtime its manifest names.

    adapter = adapter_for(manifest.runtime)          # RuntimeUnavailable when this device cannot run it
    session = adapter.load(slot_dir, manifest)        # a ModelSession
    outputs = session.run({"input": array})           # {output name: array}

Adapters register themselves by subclassing `RuntimeAdapter` with a `runtimes` tuple (the manifest
`runtime` values they serve), and import their backend inside `load`, so an agent without a backend
still starts and says "runtime X not available on this device" for that runtime's bundles. Here:

    onnxruntime   onnxruntime; also `tensorrt` bundles, from their ONNX on the CPU execution provider
                  (the engine itself is built by `device_agent.tensorrt_engine`)
    tflite        LiteRT (`ai_edge_litert`, not TensorFlow), with the tensor map and int8 scales the
                  builder wrote to `manifest.io_quantization`

    openvino      OpenVINO on the CPU (`model/model.xml` + `.bin`), f32 inference precision as the
                  builder verified it, telemetry off

The inference server and the self-test both go through this registry, so a model switch loads the
new slot the same way the self-test did.
"""

from __future__ import annotations

import importlib.util
import queue
import sys
import threading
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol

import numpy as np

from edgepack.errors import BundleError, ModelError
from edgepack.manifest import BundleManifest, IoTensor
from edgepack.report import IoTensorQuantization


class RuntimeUnavailable(ModelError):
    """The bundle's runtime cannot run on this device (attribute: runtime)."""

    exit_code = 1


class ModelSession(Protocol):
    """A loaded model: named float/int arrays in, named arrays out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


_ADAPTERS: dict[str, type["RuntimeAdapter"]] = {}


class RuntimeAdapter:
    """Base of every runtime adapter; subclasses register by declaring `runtimes`."""

    runtimes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for runtime in cls.runtimes:
            _ADAPTERS[runtime] = cls

    def unavailable_reason(self) -> str | None:
        """None when this device can run the runtime, else why not (a missing package, a missing device)."""
        return None

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> ModelSession:
        raise NotImplementedError


def registered_runtimes() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_for(runtime: str) -> RuntimeAdapter:
    """The adapter that runs `runtime` here, or RuntimeUnavailable saying why it cannot."""
    cls = _ADAPTERS.get(runtime)
    if cls is None:
        raise RuntimeUnavailable(f"runtime {runtime} not available on this device (this agent runs: "
                                 f"{', '.join(registered_runtimes()) or 'none'})", runtime=runtime)
    adapter = cls()
    reason = adapter.unavailable_reason()
    if reason is not None:
        raise RuntimeUnavailable(f"runtime {runtime} not available on this device: {reason}", runtime=runtime)
    return adapter


def model_path(bundle_dir: Path, manifest: BundleManifest, member: str | None = None) -> Path:
    """The file of a manifest-listed member (default: `manifest.model`) inside an installed bundle."""
    member = member or manifest.model
    if not manifest.lists(member):
        raise BundleError(f"manifest names model {member!r}, which is not a listed member")
    parts = PurePosixPath(member).parts
    if member.startswith("/") or ".." in parts:
        raise BundleError(f"manifest model path {member!r} escapes the bundle")
    return Path(bundle_dir).joinpath(*parts)


class _OnnxSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())
        self._output_list = list(self.output_names)  # built once: run() is on the serving hot path
        self.providers = tuple(session.get_providers())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_list, feeds if type(feeds) is dict else dict(feeds))
        return dict(zip(self.output_names, values))

    def close(self) -> None:
        self._session = None


class OnnxRuntimeAdapter(RuntimeAdapter):
    """onnxruntime; for `tensorrt` bundles it runs the ONNX on the CPU execution provider."""

    runtimes = ("onnxruntime", "tensorrt")

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "the onnxruntime package is not installed"
        return None

    def providers(self, manifest: BundleManifest) -> list[str]:
        import onnxruntime

        if manifest.runtime == "tensorrt":
            return ["CPUExecutionProvider"]
        available = set(onnxruntime.get_available_providers())
        wanted = [p for p in manifest.execution_providers if p in available]
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        return wanted

    @staticmethod
    def session_options() -> Any:
        """The options every served session uses (benchmarks build their bare baseline with the same)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        return options

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> ModelSession:
        import onnxruntime

        path = model_path(bundle_dir, manifest)
        options = self.session_options()
        try:
            session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=self.providers(manifest))
        except Exception as exc:  # onnxruntime raises its own exception types for any bad model
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"onnxruntime cannot load {path.name}: {first}") from None
        return _OnnxSession(session)


# ---------------------------------------------------------------------------------------------------
# LiteRT

_INTEGER = ("int8", "uint8", "int16")


def _quantize(value: np.ndarray, spec: dict) -> np.ndarray:
    """A float array as the tensor's type: real = (q - zero_point) * scale for integer tensors."""
    dtype = np.dtype(spec["dtype"])
    if spec["dtype"] not in _INTEGER:
        return value.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    scale = spec.get("scale") or 1.0
    return np.clip(np.round(value / scale + (spec.get("zero_point") or 0)), info.min, info.max).astype(dtype)


def _dequantize(value: np.ndarray, spec: dict) -> np.ndarray:
    if spec["dtype"] not in _INTEGER:
        return value.astype(np.float32, copy=False)
    return ((value.astype(np.float64) - (spec.get("zero_point") or 0)) * (spec.get("scale") or 1.0)).astype(np.float32)


class _LiteRtSession:
    """One interpreter; LiteRT interpreters are not thread-safe, so calls are serialized."""

    def __init__(self, interpreter: Any, inputs: list[dict], outputs: list[dict]) -> None:
        self._interpreter = interpreter
        self._inputs = inputs
        self._outputs = outputs
        self._lock = threading.Lock()
        self.input_names = tuple(spec["name"] for spec in inputs)
        self.output_names = tuple(spec["name"] for spec in outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            for spec in self._inputs:
                value = np.asarray(feeds[spec["name"]], dtype=np.float32)
                if spec.get("transpose"):
                    value = value.transpose(spec["transpose"])
                self._interpreter.set_tensor(spec["index"], _quantize(value.reshape(spec["tensor_shape"]), spec))
            self._interpreter.invoke()
            results = {}
            for spec in self._outputs:
                value = _dequantize(self._interpreter.get_tensor(spec["index"]), spec)
                if spec.get("transpose"):
                    value = value.transpose(spec["transpose"])
                shape = spec.get("onnx_shape")
                if shape and all(isinstance(d, int) and d > 0 for d in shape) and int(np.prod(shape)) == value.size:
                    value = value.reshape(shape)
                results[spec["name"]] = value
            return results

    def close(self) -> None:
        self._interpreter = None


class LiteRtAdapter(RuntimeAdapter):
    """LiteRT on the CPU (XNNPACK); the `edgetpu` delegate when the bundle asks for it and the device has it."""

    runtimes = ("tflite",)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("ai_edge_litert") is None:
            return "the ai-edge-litert package is not installed"
        return None

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> ModelSession:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        path = model_path(bundle_dir, manifest)
        delegates = []
        if "edgetpu" in manifest.delegates:
            try:
                delegates.append(load_delegate("libedgetpu.so.1"))
            except (ValueError, OSError) as exc:
                raise RuntimeUnavailable(f"runtime tflite with the edgetpu delegate not available on this device: {exc}",
                                         runtime="tflite") from None
        try:
            interpreter = Interpreter(model_path=str(path), experimental_delegates=delegates or None)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"LiteRT cannot load {path.name}: {str(exc).strip().splitlines()[0][:300]}") from None
        mapping = manifest.io_quantization
        inputs = self._specs(interpreter.get_input_details(), mapping.inputs if mapping else None, manifest.io.inputs)
        outputs = self._specs(interpreter.get_output_details(), mapping.outputs if mapping else None, manifest.io.outputs)
        return _LiteRtSession(interpreter, inputs, outputs)

    @staticmethod
    def _specs(details: list[dict], declared: list[IoTensorQuantization] | None, signature: list[IoTensor]) -> list[dict]:
        """Each tensor as {name (ONNX), index, tensor_shape, dtype, scale, zero_point, transpose, onnx_shape}."""
        by_tflite_name = {d["name"]: d for d in details}
        onnx_shapes = {s.name: s.shape for s in signature}
        specs = []
        if declared:
            for entry in declared:
                detail = by_tflite_name.get(entry.tflite_name)
                if detail is None:
                    raise ModelError(f"LiteRT model has no tensor {entry.tflite_name!r} that the manifest maps to {entry.name!r}")
                specs.append({**entry.model_dump(), "index": int(detail["index"]), "tensor_shape": [int(d) for d in detail["shape"]],
                              "dtype": np.dtype(detail["dtype"]).name, "onnx_shape": onnx_shapes.get(entry.name)})
            return specs
        names = [s.name for s in signature]
        for position, detail in enumerate(details):
            dtype = np.dtype(detail["dtype"]).name
            scale, zero_point = detail["quantization"]
            name = names[position] if position < len(names) else detail["name"]
            specs.append({"name": name, "index": int(detail["index"]), "tensor_shape": [int(d) for d in detail["shape"]],
                          "dtype": dtype, "scale": float(scale) if dtype in _INTEGER else None,
                          "zero_point": int(zero_point) if dtype in _INTEGER else None, "transpose": None,
                          "onnx_shape": onnx_shapes.get(name)})
        return specs


# ---------------------------------------------------------------------------------------------------
# OpenVINO


class _OpenVinoSession:
    """One compiled model; an InferRequest is not thread-safe, so each call borrows one from a pool."""

    def __init__(self, compiled: Any, input_keys: list[int], input_names: tuple[str, ...], output_keys: list[int],
                 output_names: tuple[str, ...]) -> None:
        self._compiled = compiled
        self._input_keys = input_keys  # the compiled model's port index of each name in input_names
        self._output_keys = output_keys
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            request.infer({key: feeds[name] for key, name in zip(self._input_keys, self.input_names)})
            # Copies: the request reuses its output buffers on its next call.
            return {name: np.array(request.get_output_tensor(index).data) for index, name in zip(self._output_keys, self.output_names)}
        finally:
            self._idle.put(request)

    def close(self) -> None:
        self._compiled = None
        self._idle = queue.SimpleQueue()


class OpenVinoAdapter(RuntimeAdapter):
    """OpenVINO IR (`model.xml` beside its `model.bin`) on the CPU."""

    runtimes = ("openvino",)
    # f32 as the builder verified and the self-test expects: without the pin the CPU plugin runs f32
    # IRs in bf16 on CPUs with AMX/AVX512-BF16. INT8 IRs still run their quantized ops in INT8.
    COMPILE_CONFIG: ClassVar[dict[str, Any]] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "the openvino package is not installed"
        return None

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> ModelSession:
        # OpenVINO sends usage telemetry from `import openvino` unless its telemetry module is missing;
        # a device must not phone home (see builder/runtimes/openvino.py).
        sys.modules.setdefault("openvino_telemetry", None)
        import openvino as ov

        path = model_path(bundle_dir, manifest)
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise BundleError(f"OpenVINO model {path.name} has no {weights.name} beside it")
        core = ov.Core()
        # Read the weights into memory instead of mapping them: the slot folder is rewritten by a later
        # install while a retired model may still be finishing requests.
        core.set_property({"ENABLE_MMAP": False})
        try:
            compiled = core.compile_model(str(path), "CPU", dict(self.COMPILE_CONFIG))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with C++ locations first
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"OpenVINO cannot load {path.name}: {first}") from None
        declared_inputs = [entry.name for entry in manifest.io.inputs]
        declared_outputs = [entry.name for entry in manifest.io.outputs]
        input_names, input_keys = self._match(declared_inputs, [port.get_names() for port in compiled.inputs], "input")
        output_names, output_keys = self._match(declared_outputs, [port.get_names() for port in compiled.outputs], "output")
        return _OpenVinoSession(compiled, input_keys, tuple(input_names), output_keys, tuple(output_names))

    @staticmethod
    def _match(declared: list[str], port_names: list[set[str]], kind: str) -> tuple[list[str], list[int]]:
        """The manifest's names paired with the compiled model's port indices: by tensor name, else by position."""
        if not declared:
            names = [sorted(names)[0] if names else str(index) for index, names in enumerate(port_names)]
            return names, list(range(len(port_names)))
        if len(declared) != len(port_names):
            raise ModelError(f"OpenVINO model has {len(port_names)} {kind}s, the manifest declares {len(declared)}")
        indices = []
        for position, name in enumerate(declared):
            found = next((index for index, names in enumerate(port_names) if name in names), None)
            indices.append(found if found is not None else position)
        return declared, indices
