"""OpenVINO on the host CPU: the runtime of OpenVINO IR variants (`model.xml` + `model.bin`).

Inference precision is pinned to f32. Without the pin, OpenVINO's CPU plugin silently runs f32 and
f16 IRs in bf16 on hosts with AVX512-BF16 or AMX (a build server, say); the edge CPUs the profiles
describe (Core i7-1360P, AVX2/VNNI Xeons) have neither, so the host would verify numbers the device
never computes. NNCF validates with the same pin. An INT8 IR still runs its quantized ops in INT8.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

# OpenVINO's converter and NNCF send usage telemetry to Google Analytics by default (`import openvino`
# already sends an event), each event from a forked subprocess. A build must not phone home, and
# forking a process that runs OpenVINO's thread pool killed pytest with SIGBUS. Both fall back to
# no-op stubs when `openvino_telemetry` cannot be imported, so this module, which every edgepack use
# of OpenVINO and NNCF goes through, marks it unimportable before OpenVINO loads.
sys.modules.setdefault("openvino_telemetry", None)

import openvino as ov  # noqa: E402  (at the top on purpose: a missing OpenVINO fails get_adapter() as RuntimeUnavailable)

from builder.latency import time_calls
from builder.verify import Outputs
from edgepack.errors import ModelError

# Deterministic verification: one thread, f32 arithmetic wherever the IR does not say INT8.
RUN_CONFIG = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}


def compile_ir(model_path: Path, config: dict[str, Any]) -> Any:
    """An `ov.CompiledModel` on the CPU; a model OpenVINO cannot load is a ModelError with its reason."""
    try:
        return ov.Core().compile_model(str(model_path), "CPU", config)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"OpenVINO cannot load {model_path.name}: {message[:300]}") from None


def output_keys(compiled: Any) -> list[str]:
    """One key per output, in the model's output order: its tensor name, else its position."""
    keys = []
    for index, output in enumerate(compiled.outputs):
        names = output.get_names()
        keys.append(output.get_any_name() if names else str(index))
    return keys


def infer_all(compiled: Any, feeds: Any) -> Outputs:
    """Run a compiled model on every feed; outputs stacked over samples as float64."""
    keys = output_keys(compiled)
    collected: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    request = compiled.create_infer_request()
    for feed in feeds:
        request.infer(feed)
        for index, key in enumerate(keys):
            collected[key].append(np.array(request.get_output_tensor(index).data))
    return Outputs({key: np.stack(values).astype(np.float64) for key, values in collected.items()})


class OpenVinoAdapter:
    name = "openvino"

    def run(self, model_path: Path, feeds: list[dict[str, np.ndarray]]) -> Outputs:
        return infer_all(compile_ir(model_path, RUN_CONFIG), feeds)

    def latency(self, model_path: Path, feed: dict[str, np.ndarray], warmup: int, runs: int, threads: int) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        request = compile_ir(model_path, config).create_infer_request()
        return time_calls(lambda: request.infer(feed, share_inputs=True, share_outputs=True), warmup, runs, threads)

    def versions(self) -> dict[str, str]:
        return {"openvino": ov.__version__}
