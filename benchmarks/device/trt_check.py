"""Does TensorRT really accept and run the ONNX a Jetson-profile build ships? Run on a machine with a GPU.

    python benchmarks/device/trt_check.py [--runs 200] [--keep DIR]

Steps, all in a temporary folder (or --keep DIR):
  1. build examples/digits for the `jetson` profile, signed with a key generated for this run;
  2. verify and extract the bundle (edgepack.bundle.open_bundle) and parse its `tensorrt` engine spec;
  3. build TensorRT engines with device_agent.tensorrt_engine.build_engine for the bundle's (selected)
     ONNX and for the fp16 ONNX from this build's pass cache, then once more to show the cache hit;
  4. run each engine on the bundle's self-test inputs and compare with the expected outputs under the
     bundle's tolerance (|actual - expected| <= atol + rtol * |expected|); the fp16 variant, which the
     bundle's vectors were not made for, is compared with its own ONNX run by onnxruntime on the CPU;
  5. print build, cache-hit and inference timings next to onnxruntime on the CPU.

Runs engines with TensorRT's Python API, device buffers from torch when importable, else through the
CUDA driver (libcuda) with ctypes. Without `tensorrt` it runs the ONNX through onnxruntime's
TensorrtExecutionProvider instead, when that is available.

Exit codes: 0 every output matched, 1 a mismatch or an engine that failed to build, 2 nothing here
can run TensorRT (no `tensorrt` module and no TensorrtExecutionProvider).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from builder.pipeline import BuildRequest, run_build  # noqa: E402
from device_agent.tensorrt_engine import (  # noqa: E402
    EngineSpec,
    build_engine,
    fallback_execution_providers,
    tensorrt_available,
)
from edgepack.bundle import open_bundle  # noqa: E402
from edgepack.errors import EdgepackError  # noqa: E402
from edgepack.manifest import BundleManifest  # noqa: E402
from edgepack.signing import generate_keypair, load_public_key  # noqa: E402

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], Feeds]
FP16_RTOL = 2e-2  # builder.package.SELFTEST_TOLERANCE["fp16"]


@dataclass
class Variant:
    label: str
    onnx_path: Path
    spec: EngineSpec
    cases: list[tuple[Feeds, Feeds]]  # (inputs, expected outputs)
    atol: float
    rtol: float


# ---------------------------------------------------------------------------------------------------
# build, extract, self-test vectors


def build_and_extract(work: Path) -> tuple[BundleManifest, Path, Path]:
    """Build digits for jetson into `work`; returns (manifest, extracted bundle root, pass cache dir)."""
    private_key, public_key = generate_keypair(work / "keys")
    cache = work / "cache"
    request = BuildRequest(config_path=REPO / "examples/digits/edgepack.yaml", profile="jetson", out_dir=work / "out",
                           signing_key=private_key, cache_dir=cache)
    started = time.perf_counter()
    result = run_build(request)
    if result.exit_code != 0:
        raise SystemExit(f"build failed (exit {result.exit_code}): {result.report.selection_reason[:400]}")
    bundle_path = next(p for p in result.outputs if p.suffix == ".edgepack")
    print(f"built {bundle_path.name} in {time.perf_counter() - started:.1f} s (selected {result.report.selected})")
    bundle = open_bundle(bundle_path, [load_public_key(public_key)])
    root = bundle.extract(work / "bundle")
    return bundle.manifest, root, cache


def load_selftest(root: Path, manifest: BundleManifest) -> tuple[list[tuple[Feeds, Feeds]], float, float]:
    selftest = json.loads((root / manifest.selftest).read_text())
    cases = [({name: np.load(root / member) for name, member in case["inputs"].items()},
              {name: np.load(root / member) for name, member in case["outputs"].items()})
             for case in selftest["cases"]]
    return cases, float(selftest["tolerance"]["atol"]), float(selftest["tolerance"]["rtol"])


def fp16_from_cache(cache: Path) -> Path | None:
    """The fp16 pass output of this build: the cache entry whose info is the fp16 pass's."""
    for info_path in sorted((cache / "passes").glob("*/info.json")):
        info = json.loads(info_path.read_text())
        if "keep_io_types" in info and (info_path.parent / "model.onnx").is_file():
            return info_path.parent / "model.onnx"
    return None


def onnxruntime_runner(onnx_path: Path, providers: list[Any]) -> tuple[Runner, list[str]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    return (lambda feeds: dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))), session.get_providers()


# ---------------------------------------------------------------------------------------------------
# running a serialized engine


class _TorchBuffers:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.stream = torch.cuda.Stream()

    def to_device(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self.torch.from_numpy(np.empty(shape, dtype)).cuda()

    def pointer(self, buffer: Any) -> int:
        return buffer.data_ptr()

    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def synchronize(self) -> None:
        self.stream.synchronize()

    def to_host(self, buffer: Any) -> np.ndarray:
        return buffer.cpu().numpy()

    def free(self, buffer: Any) -> None:
        del buffer


class _DriverBuffers:
    """Device memory through the CUDA driver API with ctypes: no Python CUDA package needed."""

    def __init__(self) -> None:
        self.cuda = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
        device, context = ctypes.c_int(), ctypes.c_void_p()
        self._check(self.cuda.cuInit(0), "cuInit")
        self._check(self.cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        # TensorRT uses the CUDA runtime, which works in the device's primary context: use the same one.
        self._check(self.cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
        self._check(self.cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        self.shapes: dict[int, tuple[tuple[int, ...], np.dtype]] = {}

    @staticmethod
    def _check(code: int, call: str) -> None:
        if code != 0:
            raise RuntimeError(f"{call} failed with CUDA error {code}")

    def _alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self._check(self.cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc")
        return pointer.value

    def to_device(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        pointer = self._alloc(array.nbytes)
        self._check(self.cuda.cuMemcpyHtoD_v2(ctypes.c_uint64(pointer), array.ctypes.data_as(ctypes.c_void_p),
                                              ctypes.c_size_t(array.nbytes)), "cuMemcpyHtoD")
        self.shapes[pointer] = (array.shape, array.dtype)
        return pointer

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> int:
        pointer = self._alloc(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.shapes[pointer] = (shape, np.dtype(dtype))
        return pointer

    def pointer(self, buffer: int) -> int:
        return buffer

    def stream_handle(self) -> int:
        return 0  # the default stream; TensorRT may warn that it is slower, which does not matter here

    def synchronize(self) -> None:
        self._check(self.cuda.cuCtxSynchronize(), "cuCtxSynchronize")

    def to_host(self, buffer: int) -> np.ndarray:
        shape, dtype = self.shapes[buffer]
        out = np.empty(shape, dtype)
        self._check(self.cuda.cuMemcpyDtoH_v2(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(buffer),
                                              ctypes.c_size_t(out.nbytes)), "cuMemcpyDtoH")
        return out

    def free(self, buffer: int) -> None:
        self.shapes.pop(buffer, None)
        self.cuda.cuMemFree_v2(ctypes.c_uint64(buffer))


def _buffers() -> Any:
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchBuffers()
    except ImportError:
        pass
    return _DriverBuffers()


def tensorrt_runner(engine_path: Path, buffers: Any) -> Runner:
    """Run a serialized engine with the name-based I/O API (TensorRT 8.5+: set_tensor_address, execute_async_v3)."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(feeds: Feeds) -> Feeds:
        held = []
        try:
            for name in inputs:
                array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(engine.get_tensor_dtype(name)))
                context.set_input_shape(name, array.shape)
                held.append(buffers.to_device(array))
                context.set_tensor_address(name, buffers.pointer(held[-1]))
            device_outputs = {}
            for name in outputs:
                shape = tuple(context.get_tensor_shape(name))
                device_outputs[name] = buffers.empty(shape, trt.nptype(engine.get_tensor_dtype(name)))
                held.append(device_outputs[name])
                context.set_tensor_address(name, buffers.pointer(device_outputs[name]))
            if not context.execute_async_v3(buffers.stream_handle()):
                raise RuntimeError("execute_async_v3 returned False")
            buffers.synchronize()
            return {name: buffers.to_host(buffer).astype(np.float32) for name, buffer in device_outputs.items()}
        finally:
            for buffer in held:
                buffers.free(buffer)

    run.keep_alive = (runtime, engine, context)  # type: ignore[attr-defined]  # the runtime must outlive its engine
    return run


# ---------------------------------------------------------------------------------------------------
# compare and time


def compare(run: Runner, variant: Variant) -> tuple[bool, float, int]:
    """(all within tolerance, largest |actual - expected|, cases whose argmax agrees)."""
    ok, worst, agree = True, 0.0, 0
    for feeds, expected in variant.cases:
        actual = run(feeds)
        for name, want in expected.items():
            got = np.asarray(actual[name], dtype=np.float32).reshape(want.shape)
            diff = np.abs(got - want)
            worst = max(worst, float(diff.max()))
            ok &= bool(np.all(diff <= variant.atol + variant.rtol * np.abs(want)))
        first = next(iter(expected))
        agree += int(np.argmax(actual[first]) == np.argmax(expected[first]))
    return ok, worst, agree


def p50_ms(run: Runner, feeds: Feeds, runs: int) -> float:
    for _ in range(min(10, runs)):
        run(feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - started) * 1e3)
    return float(np.percentile(times, 50))


def check_variant(variant: Variant, engines: Path, runs: int, buffers: Any | None) -> bool:
    print(f"\n== {variant.label}: {variant.onnx_path}  (trtexec equivalent: {variant.spec.trtexec or 'n/a'})")
    cpu_run, _ = onnxruntime_runner(variant.onnx_path, ["CPUExecutionProvider"])
    cpu_ms = p50_ms(cpu_run, variant.cases[0][0], runs)
    if buffers is not None:
        try:
            built = build_engine(variant.onnx_path, variant.spec, engines)
        except EdgepackError as exc:
            print(f"   FAIL engine build: {exc}")
            return False
        if built is None:
            print("   FAIL build_engine returned None although tensorrt is importable")
            return False
        started = time.perf_counter()
        again = build_engine(variant.onnx_path, variant.spec, engines)
        hit_s = time.perf_counter() - started
        print(f"   TensorRT {built.trt_version} on {built.device_name}: engine {built.path.stat().st_size / 1024:.0f} KiB, "
              f"built in {built.build_seconds:.1f} s, cache hit {hit_s * 1e3:.0f} ms (cached={again is not None and again.cached})")
        run = tensorrt_runner(built.path, buffers)
        how = "TensorRT engine"
    else:
        providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": variant.spec.fp16, "trt_int8_enable": variant.spec.int8}),
                     "CUDAExecutionProvider", "CPUExecutionProvider"]
        started = time.perf_counter()
        run, used = onnxruntime_runner(variant.onnx_path, providers)
        run(variant.cases[0][0])  # the TensorRT EP builds its engine on the first run
        print(f"   onnxruntime providers {used}; session + first run {time.perf_counter() - started:.1f} s")
        if not used or used[0] != "TensorrtExecutionProvider":
            print("   FAIL onnxruntime did not put TensorrtExecutionProvider first")
            return False
        how = "onnxruntime TensorRT EP"
    ok, worst, agree = compare(run, variant)
    gpu_ms = p50_ms(run, variant.cases[0][0], runs)
    verdict = "ok" if ok else "MISMATCH"
    print(f"   {verdict}: {len(variant.cases)} cases, max |diff| {worst:.4g} (atol {variant.atol:.4g}, rtol {variant.rtol}), "
          f"argmax agrees {agree}/{len(variant.cases)}")
    print(f"   p50 latency (incl. buffer allocation and copies): {how} {gpu_ms:.3f} ms | onnxruntime CPU {cpu_ms:.3f} ms | ratio {cpu_ms / gpu_ms:.1f}x")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed inferences per variant")
    parser.add_argument("--keep", type=Path, help="work in this folder (created) and keep it, instead of a temp folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="   %(name)s: %(message)s")
    logging.getLogger("device_agent").setLevel(logging.INFO)

    has_trt = tensorrt_available()
    has_ep = "TensorrtExecutionProvider" in fallback_execution_providers()
    if not has_trt and not has_ep:
        print("cannot check: `tensorrt` is not importable and onnxruntime has no TensorrtExecutionProvider "
              f"(providers here: {fallback_execution_providers() or 'none'})")
        return 2

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgepack-trt-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        manifest, root, cache = build_and_extract(work)
        if manifest.runtime != "tensorrt":
            print(f"FAIL: the jetson bundle's runtime is {manifest.runtime!r}, expected 'tensorrt'")
            return 1
        spec = EngineSpec.from_manifest(manifest.tensorrt)
        cases, atol, rtol = load_selftest(root, manifest)
        variants = [Variant(f"bundle ({manifest.variant}, selected)", root / spec.onnx_member, spec, cases, atol, rtol)]
        fp16 = fp16_from_cache(cache)
        if fp16 is not None and manifest.precision != "fp16":
            # The bundle's vectors hold the selected variant's outputs; fp16 is checked against itself on the CPU.
            cpu_run, _ = onnxruntime_runner(fp16, ["CPUExecutionProvider"])
            fp16_cases = [(feeds, cpu_run(feeds)) for feeds, _ in cases]
            scale = max(float(np.abs(out).max()) for _, outputs in fp16_cases for out in outputs.values())
            fp16_spec = EngineSpec(onnx_member="model/model.onnx", fp16=True, int8=False, sparse_weights=False,
                                   trtexec="trtexec --onnx=model/model.onnx --saveEngine=model.engine --fp16")
            variants.append(Variant("fp16 (from the build cache)", fp16, fp16_spec, fp16_cases,
                                    max(1e-5, FP16_RTOL * scale), FP16_RTOL))
        else:
            print("fp16 ONNX not found in the build cache: checking the selected variant only")

        buffers = _buffers() if has_trt else None
        results = [check_variant(v, work / "engines", args.runs, buffers) for v in variants]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{sum(results)}/{len(results)} variants matched")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
