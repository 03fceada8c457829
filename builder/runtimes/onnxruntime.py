"""onnxruntime on the host CPU: the runtime of ONNX variants (and TensorRT-ready ONNX, verified here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from builder.latency import measure_latency
from builder.verify import Outputs, run_model


class OnnxRuntimeAdapter:
    name = "onnxruntime"

    def run(self, model_path: Path, feeds: list[dict[str, np.ndarray]]) -> Outputs:
        return run_model(model_path, feeds)

    def latency(self, model_path: Path, feed: dict[str, np.ndarray], warmup: int, runs: int, threads: int) -> dict[str, Any]:
        return measure_latency(model_path, feed, warmup, runs, threads)

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}
