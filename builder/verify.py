"""Verification: run a variant in the target's runtime on the validation set and compare with fp32.

Always reported: top-1 agreement with fp32, mean cosine similarity and max/mean absolute error over
all outputs. The task metric (`top1` against labels, or `agreement`/`cosine`/`mae`, or a user's
`module:function`) gives `accuracy`; `accuracy_delta` is candidate minus fp32 in the metric's units.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from builder.onnx_utils import make_session
from edgepack.errors import ConfigError, ModelError

HIGHER_IS_BETTER = {"top1": True, "agreement": True, "cosine": True, "mae": False}


@dataclasses.dataclass
class Outputs:
    """Outputs of one model on the validation set: per output name, stacked over samples."""

    arrays: dict[str, np.ndarray]

    @property
    def first(self) -> np.ndarray:
        return next(iter(self.arrays.values()))


def run_model(model_path: Path, feeds: list[dict[str, np.ndarray]], threads: int = 1) -> Outputs:
    session = make_session(model_path, threads=threads)
    names = [o.name for o in session.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            collected[name].append(np.asarray(value))
    return Outputs({n: np.stack(v).astype(np.float64) for n, v in collected.items()})


def _agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose prediction equals fp32's. A sequence of distributions (a CTC text recogniser's
    [1, T, C] per sample, a tagger's) agrees when the argmax at every position does, so the line reads the
    same; the argmax of the whole flattened output would compare one cell, a near tie among the T
    confident ones (PP-OCRv4 rec: fp16 agreed on 0 % while reading every line alike). A [1, C] output has
    one position: its top-1."""
    classes = reference.shape[-1] if reference.ndim >= 3 else 1
    if classes > 1 and reference[0].size // classes > 1:
        positions = (len(reference), -1, classes)
        same = candidate.reshape(positions).argmax(axis=-1) == reference.reshape(positions).argmax(axis=-1)
        return float(np.all(same, axis=1).mean())
    return float((_predictions(candidate) == _predictions(reference)).mean())


def _predictions(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(array.shape[0], -1)
    if flat.shape[1] == 1:  # a single score per sample: a binary decision at 0.5
        return (flat[:, 0] > 0.5).astype(np.int64)
    return flat.argmax(axis=1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    denom = np.where(na * nb == 0, 1.0, na * nb)
    cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / denom)
    return float(np.clip(cos, -1.0, 1.0).mean())


def load_metric(metric: str) -> Callable[..., float] | None:
    """A user metric `module:function(outputs: dict[str, ndarray], labels) -> float`, higher is better."""
    if metric in HIGHER_IS_BETTER:
        return None
    module_name, _, function_name = metric.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"metric {metric!r} cannot be imported: {exc}") from None
    if not callable(function):
        raise ConfigError(f"metric {metric!r} is not callable")
    return function


def compare(candidate: Outputs, reference: Outputs, labels: np.ndarray | None, metric: str) -> dict[str, Any]:
    """Metrics of `candidate` (against labels where the metric needs them) and its agreement with fp32."""
    # Outputs are matched by position: converters (onnx2tf, OpenVINO) may rename them, never reorder.
    pairs = list(zip(candidate.arrays.values(), reference.arrays.values()))
    if len(pairs) != len(reference.arrays):
        raise ModelError(f"the variant has {len(candidate.arrays)} outputs, the fp32 reference {len(reference.arrays)}")
    pairs = [(c.reshape(r.shape) if c.size == r.size else c, r) for c, r in pairs]
    for c, r in pairs:
        if c.shape != r.shape:
            raise ModelError(f"a variant output has shape {list(c.shape)}, the fp32 reference {list(r.shape)}")
    agreement = _agreement(pairs[0][0], pairs[0][1])
    cos = float(np.mean([_cosine(c, r) for c, r in pairs]))
    abs_err = [np.abs(c - r) for c, r in pairs]
    max_abs = float(max(e.max() for e in abs_err))
    mean_abs = float(np.mean([e.mean() for e in abs_err]))
    if metric == "top1":
        accuracy = float((_predictions(pairs[0][0]) == labels.reshape(-1).astype(np.int64)).mean())
    elif metric == "agreement":
        accuracy = agreement
    elif metric == "cosine":
        accuracy = cos
    elif metric == "mae":
        target = labels.reshape(candidate.first.shape).astype(np.float64) if labels is not None else reference.first
        accuracy = float(np.abs(pairs[0][0] - target).mean())
    else:
        accuracy = float(load_metric(metric)(candidate.arrays, labels))
    return {
        "accuracy": accuracy,
        "agreement": agreement,
        "cosine": cos,
        "max_abs_error": max_abs,
        "mean_abs_error": mean_abs,
    }


def accuracy_drop(metric: str, reference: float, candidate: float) -> float:
    """How much worse the candidate is, in metric units (positive = worse)."""
    higher_is_better = HIGHER_IS_BETTER.get(metric, True)
    return (reference - candidate) if higher_is_better else (candidate - reference)
