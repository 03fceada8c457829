"""Build the TensorRT engine of a `tensorrt` bundle on the device, and cache it.

A TensorRT engine is specific to the GPU and the TensorRT version that built it, so a bundle carries
the ONNX model plus a `tensorrt` spec in its manifest (written by `builder.targets.onnx.tensorrt_engine_spec`):

    {"build_on_device": true, "explicit_quantization": true, "sparse_tensor_cores": false,
     "trtexec": "trtexec --onnx=model/model.onnx --saveEngine=model.engine --int8 --fp16", "doc": "…"}

`EngineSpec.from_manifest` checks `manifest.tensorrt` (a malformed one is a BundleError naming the field) and
`build_engine` turns the ONNX into a serialized engine with TensorRT's Python API, using the same
builder flags `trtexec` would. Engines are cached under `cache_dir` by `engine_cache_key` (ONNX sha256,
TensorRT version, GPU name and the build flags), so a restart or a rollback reuses the engine instead
of spending minutes rebuilding it.

When `tensorrt` is not importable, `build_engine` returns None and logs why; the agent then serves the
ONNX through onnxruntime (`fallback_execution_providers`: TensorRT EP, CUDA EP, else CPU).

Kept light for the device agent: only the standard library at import time; `tensorrt` is imported
inside `build_engine`, never onnx tooling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import logging
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.errors import BundleError, ModelError
from edgepack.files import atomic_write, file_sha256
from edgepack.report import TensorRTEngineSpec

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 1 << 30  # 1 GiB: enough tactics for small models; Orin Nano shares 8 GB with the CPU
ENGINE_SUFFIX = ".engine"
# onnxruntime providers that can run a tensorrt bundle's ONNX, best first (DESIGN.md: the Jetson profile).
_ONNXRUNTIME_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_REQUIRED_BOOLS = ("build_on_device", "explicit_quantization", "sparse_tensor_cores")
_MEM_POOL = re.compile(r"workspace:(\d+)([KMG]?)$", re.IGNORECASE)
_UNIT = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # trtexec: a bare number is MiB


def tensorrt_available() -> bool:
    """True when the `tensorrt` Python package can be imported here (it is not imported)."""
    return importlib.util.find_spec("tensorrt") is not None


def engine_cache_key(onnx_sha256: str, trt_version: str, device_name: str, *, build_flags: tuple[str, ...] = ()) -> str:
    """The cache key of an engine: sha256 over the ONNX hash, TensorRT version, GPU name and build flags.

    Any one of them changing gives another key: an engine from another TensorRT or another GPU does not
    deserialize (or runs slower than it should), and flags decide the kernels it contains.
    """
    text = json.dumps([onnx_sha256, trt_version, device_name, sorted(build_flags)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class EngineSpec:
    """How to build a bundle's engine, as the builder declared it in `manifest.tensorrt`."""

    onnx_member: str  # bundle member of the ONNX, e.g. "model/model.onnx"
    fp16: bool
    int8: bool  # explicit quantization: scales come from the Q/DQ nodes, no calibrator
    sparse_weights: bool  # 2:4 structured sparsity on Ampere/Orin sparse tensor cores
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    trtexec: str = ""  # the equivalent command line, for logs and for people

    def __post_init__(self) -> None:
        _check_member("tensorrt.trtexec", self.onnx_member)
        if self.workspace_bytes <= 0:
            raise BundleError(f"tensorrt.trtexec: workspace must be positive, got {self.workspace_bytes}", field="tensorrt.trtexec")

    @property
    def build_flags(self) -> tuple[str, ...]:
        """The builder flags, named as TensorRT's BuilderFlag members (part of the cache key)."""
        flags = [name for name, on in (("FP16", self.fp16), ("INT8", self.int8), ("SPARSE_WEIGHTS", self.sparse_weights)) if on]
        return (*flags, f"workspace={self.workspace_bytes}")

    @classmethod
    def from_manifest(cls, spec: TensorRTEngineSpec | Mapping[str, Any] | Any) -> "EngineSpec":
        """Parse `manifest.tensorrt` (or the same as a JSON object); BundleError naming the field when it is malformed.

        The manifest model has checked the types already; what is left is whether the flags agree with
        the trtexec command line. Unknown keys of a JSON object (e.g. "doc") are ignored; unknown trtexec
        flags are refused, because an agent that silently skipped one would build a different engine
        from the one the builder verified.
        """
        if isinstance(spec, TensorRTEngineSpec):
            spec = spec.model_dump()
        if not isinstance(spec, Mapping):
            raise BundleError(f"tensorrt: expected an object, got {type(spec).__name__}", field="tensorrt")
        for key in (*_REQUIRED_BOOLS, "trtexec"):
            if key not in spec:
                raise BundleError(f"tensorrt.{key}: missing", field=f"tensorrt.{key}")
        for key in _REQUIRED_BOOLS:
            if not isinstance(spec[key], bool):
                raise BundleError(f"tensorrt.{key}: expected true or false, got {spec[key]!r}", field=f"tensorrt.{key}")
        if spec["build_on_device"] is not True:
            raise BundleError("tensorrt.build_on_device: only engines built on the device are supported", field="tensorrt.build_on_device")
        command = spec["trtexec"]
        if not isinstance(command, str):
            raise BundleError(f"tensorrt.trtexec: expected a command line, got {command!r}", field="tensorrt.trtexec")
        parsed = _parse_trtexec(command)
        if spec["explicit_quantization"] != parsed["int8"]:
            raise BundleError(
                f"tensorrt.explicit_quantization: {spec['explicit_quantization']} disagrees with trtexec "
                f"({'has' if parsed['int8'] else 'lacks'} --int8)", field="tensorrt.explicit_quantization")
        if spec["sparse_tensor_cores"] != parsed["sparse_weights"]:
            raise BundleError(
                f"tensorrt.sparse_tensor_cores: {spec['sparse_tensor_cores']} disagrees with trtexec "
                f"({'has' if parsed['sparse_weights'] else 'lacks'} --sparsity=enable)", field="tensorrt.sparse_tensor_cores")
        return cls(trtexec=command, **parsed)


def _check_member(field: str, member: str) -> None:
    path = PurePosixPath(member)
    if not member or path.is_absolute() or ".." in path.parts or "\\" in member or path.suffix != ".onnx":
        raise BundleError(f"{field}: --onnx must name a relative .onnx member of the bundle, got {member!r}", field=field)


def _parse_trtexec(command: str) -> dict[str, Any]:
    field = "tensorrt.trtexec"
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise BundleError(f"{field}: cannot split {command!r}: {exc}", field=field) from None
    if not words or words[0] != "trtexec":
        raise BundleError(f"{field}: expected a command starting with 'trtexec', got {command!r}", field=field)
    parsed: dict[str, Any] = {"onnx_member": None, "fp16": False, "int8": False, "sparse_weights": False,
                              "workspace_bytes": DEFAULT_WORKSPACE_BYTES}
    for word in words[1:]:
        name, _, value = word.partition("=")
        if name == "--onnx" and value:
            parsed["onnx_member"] = value
        elif name == "--saveEngine" and value:
            pass  # the agent decides where engines go (its cache)
        elif word in ("--fp16", "--int8"):
            parsed[word[2:]] = True
        elif name == "--sparsity" and value in ("enable", "disable"):
            parsed["sparse_weights"] = value == "enable"
        elif name == "--memPoolSize" and _MEM_POOL.match(value):
            number, unit = _MEM_POOL.match(value).groups()  # type: ignore[union-attr]
            parsed["workspace_bytes"] = int(number) * _UNIT[unit.upper()]
        else:
            raise BundleError(f"{field}: unsupported trtexec argument {word!r}", field=field)
    if parsed["onnx_member"] is None:
        raise BundleError(f"{field}: no --onnx=<member> in {command!r}", field=field)
    return parsed


@dataclass(frozen=True)
class EngineResult:
    """A serialized engine ready to deserialize: where it is and what it took."""

    path: Path
    build_seconds: float  # 0.0 when it came from the cache
    cached: bool
    cache_key: str
    trt_version: str
    device_name: str


def gpu_name(device_index: int = 0) -> str:
    """The CUDA device's name and compute capability through the driver (libcuda), e.g. "Orin (sm_87)".

    ctypes on libcuda keeps this free of any CUDA Python package; "unknown-gpu" when there is no driver.
    """
    library = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(library)
        device = ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        major, minor = ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0:
            return "unknown-gpu"
        if cuda.cuDeviceGetName(name, len(name), device) != 0:
            return "unknown-gpu"
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
    except (OSError, AttributeError):
        return "unknown-gpu"
    return f"{name.value.decode(errors='replace').strip()} (sm_{major.value}{minor.value})"


def fallback_execution_providers() -> list[str]:
    """onnxruntime providers to serve a tensorrt bundle's ONNX with when no engine can be built."""
    try:
        import onnxruntime
    except ImportError:
        return []
    available = set(onnxruntime.get_available_providers())
    return [p for p in _ONNXRUNTIME_PROVIDERS if p in available]


def build_engine(onnx_path: Path, spec: EngineSpec, cache_dir: Path) -> EngineResult | None:
    """Build (or reuse from `cache_dir`) the serialized TensorRT engine of `onnx_path`.

    Returns None, after logging why, when `tensorrt` is not importable here. Raises ModelError when
    TensorRT's ONNX parser rejects the model (naming the node it reports) or the builder cannot build it.
    """
    onnx_path = Path(onnx_path)
    if not tensorrt_available():
        providers = fallback_execution_providers() or ["none (onnxruntime is not installed)"]
        log.info("tensorrt is not importable on this device: no engine built for %s; serving through onnxruntime with %s",
                 onnx_path.name, ", ".join(providers))
        return None
    import tensorrt as trt

    device_name = gpu_name()
    key = engine_cache_key(file_sha256(onnx_path), trt.__version__, device_name, build_flags=spec.build_flags)
    cache_dir = Path(cache_dir)
    engine_path = cache_dir / f"{key}{ENGINE_SUFFIX}"
    if engine_path.is_file() and engine_path.stat().st_size > 0:
        log.info("TensorRT engine for %s from cache: %s", onnx_path.name, engine_path)
        return EngineResult(engine_path, 0.0, True, key, trt.__version__, device_name)

    started = time.perf_counter()
    serialized = _build_serialized(trt, onnx_path, spec)
    build_seconds = time.perf_counter() - started
    atomic_write(engine_path, serialized)
    atomic_write(engine_path.with_suffix(".json"), json.dumps(
        {"onnx": onnx_path.name, "trt_version": trt.__version__, "device": device_name, "flags": list(spec.build_flags),
         "trtexec": spec.trtexec, "build_seconds": round(build_seconds, 3)}, sort_keys=True).encode())
    log.info("TensorRT %s built the engine for %s on %s in %.1f s: %s", trt.__version__, onnx_path.name, device_name,
             build_seconds, engine_path)
    return EngineResult(engine_path, build_seconds, False, key, trt.__version__, device_name)


def _build_serialized(trt: Any, onnx_path: Path, spec: EngineSpec) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since TensorRT 10, where the flag is deprecated and may be absent.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(1 << int(explicit) if explicit is not None else 0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weights next to the model.
    if not parser.parse_from_file(str(onnx_path)):
        raise _parser_error(parser, onnx_path)

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    else:  # TensorRT < 8.4 (JetPack 4)
        config.max_workspace_size = spec.workspace_bytes
    for wanted, flag_name in ((spec.fp16, "FP16"), (spec.int8, "INT8"), (spec.sparse_weights, "SPARSE_WEIGHTS")):
        if wanted:
            flag = getattr(trt.BuilderFlag, flag_name, None)
            if flag is None:
                raise ModelError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag_name}, which this bundle needs",
                                 runtime="tensorrt")
            config.set_flag(flag)
    # platform_has_fast_fp16 is deprecated in TensorRT 10 and may go; only a hint for the log.
    if spec.fp16 and not getattr(builder, "platform_has_fast_fp16", True):
        log.warning("this GPU has no fast FP16; TensorRT will pick FP32 kernels where they are faster")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT {trt.__version__} could not build an engine for {onnx_path.name} "
                         f"(flags {', '.join(spec.build_flags)}); its log above says why", runtime="tensorrt")
    return bytes(serialized)


def _parser_error(parser: Any, onnx_path: Path) -> ModelError:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not errors:
        return ModelError(f"TensorRT's ONNX parser rejected {onnx_path.name} without saying why", runtime="tensorrt")
    first = errors[0]
    # node_name()/node_operator() exist from TensorRT 10; node() (an index, -1 for none) in every version.
    index = first.node()
    name = first.node_name() if hasattr(first, "node_name") else ""
    op = first.node_operator() if hasattr(first, "node_operator") else ""
    where = name or (f"#{index}" if index >= 0 else "")
    node = f"node {where}" + (f" ({op})" if op else "") if where else "the graph"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return ModelError(f"TensorRT's ONNX parser rejected {onnx_path.name} at {node}: {first.desc()}{more}",
                      runtime="tensorrt", node_name=where, op_type=op)
