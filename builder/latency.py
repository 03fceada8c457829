"""Host latency: p50/p95 of single-sample inference after warm-up, in the runtime that serves it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from builder.onnx_utils import make_session


def time_calls(call: Callable[[], object], warmup: int, runs: int, threads: int) -> dict[str, float]:
    """p50/p95/mean in ms of `runs` calls of `call` after `warmup` untimed ones (shared by every runtime)."""
    for _ in range(warmup):
        call()
    timings = np.empty(runs)
    for index in range(runs):
        start = time.perf_counter()
        call()
        timings[index] = time.perf_counter() - start
    timings *= 1000.0
    return {
        "p50": round(float(np.percentile(timings, 50)), 4),
        "p95": round(float(np.percentile(timings, 95)), 4),
        "mean": round(float(timings.mean()), 4),
        "runs": runs,
        "threads": threads,
    }


def measure_latency(model_path: Path, feed: dict[str, np.ndarray], warmup: int = 10, runs: int = 100, threads: int = 1) -> dict[str, float]:
    session = make_session(model_path, threads=threads)
    names = [o.name for o in session.get_outputs()]
    return time_calls(lambda: session.run(names, feed), warmup, runs, threads)
