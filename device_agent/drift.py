"""Drift of live inputs and outputs against the bundle's `reference/stats.json`: the population stability index.

Method (`drift_method = "psi"`). The builder summarised every model input and output on its
validation data as decile bins (`bin_edges`, the outer two bins open-ended) and the fraction of values
in each bin (`bin_fractions`, the expected distribution e). The agent counts live values into the same
bins over a telemetry window (the actual distribution a) and reports, per input/output name,

    PSI = Σ_i (a_i − e_i) · ln(a_i / e_i)

with both distributions floored at ε = 1e-4 before the sum (an empty bin would make the log infinite).
PSI is a symmetrised Kullback–Leibler divergence: 0 for identical distributions, growing with the
shift. The usual reading, which the fleet's drift gate and retrain alert use as their scale:

    PSI < 0.1          no significant change
    0.1 ≤ PSI < 0.25   moderate drift: worth watching
    PSI ≥ 0.25         major drift: the model sees data unlike what it was validated on

A name is scored only when the window counted at least `min_values` of its values (default 100) from at
least `min_requests` requests (default 5), since PSI over a handful of values is noise (its expected
value on unchanged data is about (bins − 1)/n), and the values of one request are not independent (the
pixels of one image): on the digits validation data the input's PSI over 1 random image reaches 0.28 at
the 99th percentile (above the 0.25 alert threshold), over 2 images 0.15, over 5 images 0.044.

Cost: values are binned with one `searchsorted` per tensor against the reference's edges (about 8 us
for the digits model's two tensors). A tensor with more than `max_values` elements (default 4096) is
subsampled at random positions, and with `min_interval_s` set a request is binned only if the last
binned one is at least that long ago; the agent uses window_s / 256, so a window bins at most about 256
requests however busy the device is (the telemetry window's request and latency counts stay exact).
On a device serving fewer requests than that, every request is binned. Choosing requests by time,
independently of their values, keeps the distribution unbiased. Values that are not finite, and
tensors that are not numbers, are ignored.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.clock import SYSTEM_CLOCK, Clock
from edgepack.manifest import BundleManifest

log = logging.getLogger(__name__)

METHOD = "psi"
EPSILON = 1e-4
MODERATE = 0.1
MAJOR = 0.25


def population_stability_index(actual: np.ndarray, expected: np.ndarray, epsilon: float = EPSILON) -> float:
    """PSI of two distributions over the same bins (counts or fractions; each is normalised here)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape or a.size == 0 or a.sum() <= 0 or e.sum() <= 0:
        raise ValueError("PSI needs two non-empty distributions over the same bins")
    a = np.maximum(a / a.sum(), epsilon)
    e = np.maximum(e / e.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class _Bins:
    """One input's or output's reference bins and this window's live counts."""

    name: str
    inner_edges: np.ndarray  # the edges between bins; the first and last bins are open-ended
    expected: np.ndarray
    counts: np.ndarray
    requests: int = 0  # requests that added values this window


class DriftMonitor:
    """Streaming histograms of live values in the reference's bins, PSI per name per window. Thread-safe."""

    method = METHOD

    def __init__(self, reference_stats: Mapping[str, Any], *, max_values: int = 4096, min_values: int = 100,
                 min_requests: int = 5, min_interval_s: float = 0.0, seed: int | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.max_values = int(max_values)
        self.min_values = int(min_values)
        self.min_requests = int(min_requests)
        self.min_interval_s = float(min_interval_s)
        self.skipped_requests = 0  # left out by min_interval_s (this window; approximate under threads)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._next_allowed = 0.0
        self._bins: dict[str, _Bins] = {}
        reference_method = reference_stats.get("method", METHOD)
        if reference_method != METHOD:
            log.warning("reference stats use method %r; this agent computes %r over their bins", reference_method, METHOD)
        for section in ("inputs", "outputs"):
            for name, summary in (reference_stats.get(section) or {}).items():
                bins = _bins_from_summary(str(name), summary)
                if bins is not None and bins.name not in self._bins:
                    self._bins[bins.name] = bins

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest: BundleManifest | None = None, **options: Any) -> "DriftMonitor | None":
        """The monitor for an installed bundle, or None when it carries no usable reference stats (`manifest.reference_stats`)."""
        member = manifest.reference_stats if manifest is not None else "reference/stats.json"
        if manifest is not None and not manifest.lists(member):
            return None
        try:
            document = json.loads((Path(bundle_dir) / member).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s of %s: %s; no drift scores for it", member, bundle_dir, exc)
            return None
        if not isinstance(document, dict):
            return None
        monitor = cls(document, **options)
        return monitor if monitor.names else None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._bins)

    def observe(self, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any] | None = None) -> bool:
        """Count one request's values; False when `min_interval_s` skipped it."""
        if self.min_interval_s:
            now = self._clock.monotonic()
            if now < self._next_allowed:
                self.skipped_requests += 1
                return False
            self._next_allowed = now + self.min_interval_s
        binned: list[tuple[_Bins, np.ndarray]] = []
        for tensors in (inputs, outputs):
            if not tensors:
                continue
            for name, value in tensors.items():
                bins = self._bins.get(name)
                if bins is None:
                    continue
                counts = self._count(bins, value)
                if counts is not None:
                    binned.append((bins, counts))
        if binned:
            with self._lock:
                for bins, counts in binned:
                    bins.counts += counts
                    bins.requests += 1
        return True

    def _count(self, bins: _Bins, value: Any) -> np.ndarray | None:
        try:
            flat = np.asarray(value).reshape(-1)
        except (TypeError, ValueError):
            return None
        if flat.dtype.kind not in "biuf" or flat.size == 0:
            return None
        if flat.size > self.max_values:
            flat = flat[self._rng.integers(0, flat.size, self.max_values)]
        if flat.dtype.kind == "f":
            flat = flat[np.isfinite(flat)]
        index = np.searchsorted(bins.inner_edges, flat, side="right")
        return np.bincount(index, minlength=bins.counts.size)

    def counts(self) -> dict[str, np.ndarray]:
        """This window's live counts per name (copies)."""
        with self._lock:
            return {name: bins.counts.copy() for name, bins in self._bins.items()}

    def scores(self, reset: bool = True) -> dict[str, float]:
        """PSI per name with at least `min_values` values from `min_requests` requests this window; `reset` starts the next window."""
        with self._lock:
            snapshot = {name: (bins.counts.copy(), bins.requests) for name, bins in self._bins.items()}
            if reset:
                for bins in self._bins.values():
                    bins.counts[:] = 0
                    bins.requests = 0
                self.skipped_requests = 0
        result = {}
        for name, (counts, requests) in snapshot.items():
            if counts.sum() < max(self.min_values, 1) or requests < self.min_requests:
                continue
            score = population_stability_index(counts, self._bins[name].expected)
            result[name] = round(score, 6) if math.isfinite(score) else score
        return result


def _bins_from_summary(name: str, summary: Any) -> _Bins | None:
    """The bins of one reference summary (builder/stats.py), None when it has none usable."""
    if not isinstance(summary, Mapping):
        return None
    edges, fractions = summary.get("bin_edges"), summary.get("bin_fractions")
    if not isinstance(edges, list) or not isinstance(fractions, list) or len(edges) != len(fractions) + 1 or len(fractions) < 2:
        return None
    try:
        edge_array = np.asarray(edges, dtype=np.float64)
        expected = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if not np.all(np.isfinite(edge_array)) or np.any(np.diff(edge_array) < 0) or np.any(expected < 0) or expected.sum() <= 0:
        log.warning("reference stats of %r have malformed bins; no drift score for it", name)
        return None
    return _Bins(name=name, inner_edges=edge_array[1:-1].copy(), expected=expected,
                 counts=np.zeros(expected.size, dtype=np.int64))
