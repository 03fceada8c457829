"""The latency histogram devices send and the fleet merges, and the one quantile function both use.

    histogram = LatencyHistogram()             # the 64 LATENCY_BOUNDS_MS buckets plus an overflow bucket
    histogram.add(3.2)
    histogram.percentile(0.95)                 # interpolated in its bucket, narrowed by the min and max seen
    bounds, counts = from_wire(payload["latency_ms"]["bounds_ms"], payload["latency_ms"]["counts"])
    quantile(bounds, merge_counts([counts_a, counts_b]), 0.95)

`LATENCY_BOUNDS_MS` are 64 bucket upper bounds log-spaced from 0.05 ms to 10 s (about 21 % apart), the
same on every device, so histograms add across devices and windows. `counts` has one more entry than
`bounds`: the overflow bucket (above the last bound). A quantile is linear inside the bucket holding its
rank; the first bucket starts at 0 ms. A device knows its window's smallest and largest latency and
narrows the first and last buckets with them (and so can place a rank in the overflow bucket); a merged
histogram has no such bounds, so a rank in the overflow bucket is `math.inf` there.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

from edgepack.protocol import LatencySummary


def log_bounds(low: float, high: float, count: int) -> tuple[float, ...]:
    """`count` log-spaced bucket upper bounds from `low` to `high`, rounded to 4 significant digits."""
    ratio = (high / low) ** (1.0 / (count - 1))
    return tuple(float(f"{low * ratio ** i:.4g}") for i in range(count))


LATENCY_BOUNDS_MS: tuple[float, ...] = log_bounds(0.05, 10_000.0, 64)
"""Upper bounds of the latency buckets in ms; the same on every device (the fleet merges histograms)."""


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float, *,
             minimum: float | None = None, maximum: float | None = None) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1) of a histogram, linear within the bucket that holds its rank.

    None when the histogram is empty. `minimum`/`maximum` (the smallest and largest value counted, when
    known) narrow the bucket ends; without `maximum`, a rank in the overflow bucket is `math.inf`."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(bounds) and maximum is None:
                return math.inf
            lower = bounds[index - 1] if index > 0 else 0.0
            upper = bounds[index] if index < len(bounds) else maximum
            if minimum is not None:
                lower = max(lower, minimum)
            if maximum is not None:
                upper = min(upper, maximum)
            if upper < lower:
                upper = lower
            return lower + (upper - lower) * max(rank - seen, 0.0) / count
        seen += count
    return math.inf if maximum is None else maximum


def merge_counts(histograms: Iterable[Sequence[int]]) -> list[int]:
    """Bucket-wise sum of histograms that share the same bounds."""
    return [sum(column) for column in zip(*histograms)]


def from_wire(raw_bounds: object, raw_counts: object) -> tuple[tuple[float, ...], list[int]] | None:
    """(bounds, counts with the overflow bucket last) from a telemetry message's `bounds_ms`/`counts`,
    or None when absent or unusable (bounds not finite and increasing, counts not matching, negative)."""
    if not raw_bounds:
        return None
    if (isinstance(raw_bounds, (list, tuple)) and len(raw_bounds) == len(LATENCY_BOUNDS_MS)
            and tuple(raw_bounds) == LATENCY_BOUNDS_MS and isinstance(raw_counts, list)
            and all(type(count) is int and count >= 0 for count in raw_counts)):
        # the agent's own buckets (nearly every window): nothing to convert or check but the counts
        if len(raw_counts) == len(LATENCY_BOUNDS_MS) + 1:
            return LATENCY_BOUNDS_MS, list(raw_counts)
        if len(raw_counts) == len(LATENCY_BOUNDS_MS):
            return LATENCY_BOUNDS_MS, [*raw_counts, 0]
    try:
        bounds = tuple(float(bound) for bound in raw_bounds)  # type: ignore[attr-defined]
        counts = [int(count) for count in (raw_counts or [])]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(counts) == len(bounds):
        counts.append(0)  # sent without the overflow bucket
    if (len(counts) != len(bounds) + 1 or any(count < 0 for count in counts)
            or not all(math.isfinite(bound) for bound in bounds)
            or any(after <= before for before, after in zip(bounds, bounds[1:]))):
        return None
    return bounds, counts


class LatencyHistogram:
    """Counts of latencies in fixed buckets, and the smallest and largest seen. Not locked: its owner locks."""

    __slots__ = ("bounds", "counts", "min", "max", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.min = float("inf")
        self.max = float("-inf")
        self.total = 0

    def bucket(self, latency_ms: float) -> int:
        """The index of the bucket `latency_ms` falls in (so a caller can search outside its lock)."""
        return bisect.bisect_left(self.bounds, latency_ms)

    def add(self, latency_ms: float, bucket: int | None = None) -> None:
        self.counts[self.bucket(latency_ms) if bucket is None else bucket] += 1
        self.total += 1
        if latency_ms < self.min:
            self.min = latency_ms
        if latency_ms > self.max:
            self.max = latency_ms

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0 ≤ q ≤ 1), interpolated inside its bucket; None when empty."""
        if self.total == 0:
            return None
        return quantile(self.bounds, self.counts, q, minimum=self.min, maximum=self.max)

    def summary(self) -> LatencySummary:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return LatencySummary(p50=rounded(self.percentile(0.50)), p95=rounded(self.percentile(0.95)),
                              p99=rounded(self.percentile(0.99)), bounds_ms=list(self.bounds), counts=list(self.counts))


__all__ = ["LATENCY_BOUNDS_MS", "LatencyHistogram", "from_wire", "log_bounds", "merge_counts", "quantile"]
