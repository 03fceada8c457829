"""Runtime adapters: run and time a model in the runtime that will serve it on the device.

Every adapter takes float feeds keyed by the ONNX input names and returns float outputs in the ONNX
output order, so variants of every format are verified against the same fp32 reference. Adapters
import their runtime lazily: a missing optional runtime is a `RuntimeUnavailable` with the extra to
install, never an ImportError at import time.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgepack.errors import EdgepackError


class RuntimeUnavailable(EdgepackError):
    """The runtime a variant needs is not installed on the build host (attribute: runtime)."""


class RuntimeAdapter(Protocol):
    name: str

    def run(self, model_path: Path, feeds: list[dict[str, np.ndarray]]) -> "Outputs": ...

    def latency(self, model_path: Path, feed: dict[str, np.ndarray], warmup: int, runs: int, threads: int) -> dict[str, Any]: ...

    def versions(self) -> dict[str, str]: ...


_CACHE: dict[str, Any] = {}


def get_adapter(runtime: str) -> RuntimeAdapter:
    """The adapter the runtime's target declares (`Target.adapter`, "module:Class"), created once."""
    if runtime in _CACHE:
        return _CACHE[runtime]
    from builder.targets import target_class

    target = target_class(runtime)
    if target is None or not target.adapter:
        raise RuntimeUnavailable(f"no runtime adapter for {runtime!r}", runtime=runtime)
    module_name, _, class_name = target.adapter.partition(":")
    extra = target.extra
    try:
        adapter = getattr(importlib.import_module(module_name), class_name)()
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"{runtime} is not installed on this host ({exc.name or exc}); install it with: pip install 'edgepack[{extra}]'",
            runtime=runtime,
        ) from None
    _CACHE[runtime] = adapter
    return adapter


from builder.verify import Outputs  # noqa: E402  (re-exported for adapters)

__all__ = ["Outputs", "RuntimeAdapter", "RuntimeUnavailable", "get_adapter"]
