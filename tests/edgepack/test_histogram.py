"""edgepack.histogram: the buckets devices fill and the fleet merges, and the one quantile function."""

from __future__ import annotations

import math

import pytest

from edgepack.histogram import LATENCY_BOUNDS_MS, LatencyHistogram, from_wire, log_bounds, merge_counts, quantile

BOUNDS = (1.0, 2.0, 4.0)


def test_bounds_are_64_log_spaced_from_50_us_to_10_s() -> None:
    assert len(LATENCY_BOUNDS_MS) == 64
    assert LATENCY_BOUNDS_MS[0] == 0.05 and LATENCY_BOUNDS_MS[-1] == 10_000.0
    ratios = [after / before for before, after in zip(LATENCY_BOUNDS_MS, LATENCY_BOUNDS_MS[1:])]
    assert all(1.20 < ratio < 1.23 for ratio in ratios)
    assert log_bounds(1.0, 8.0, 4) == (1.0, 2.0, 4.0, 8.0)


def test_quantile_is_linear_inside_the_bucket_holding_the_rank() -> None:
    counts = [0, 4, 0, 0]  # four values in (1, 2]
    assert quantile(BOUNDS, counts, 0.5) == pytest.approx(1.5)
    assert quantile(BOUNDS, counts, 1.0) == pytest.approx(2.0)
    assert quantile(BOUNDS, [2, 0, 0, 0], 0.5) == pytest.approx(0.5)  # the first bucket starts at 0 ms


def test_known_minimum_and_maximum_narrow_the_bucket() -> None:
    counts = [0, 4, 0, 0]
    assert quantile(BOUNDS, counts, 0.5, minimum=1.2, maximum=1.6) == pytest.approx(1.4)
    assert quantile(BOUNDS, counts, 0.0, minimum=1.2, maximum=1.6) == pytest.approx(1.2)


def test_overflow_is_infinite_when_merged_and_bounded_by_the_maximum_on_a_device() -> None:
    counts = [1, 0, 0, 3]
    assert math.isinf(quantile(BOUNDS, counts, 0.9))
    assert quantile(BOUNDS, counts, 1.0, minimum=0.5, maximum=9.0) == pytest.approx(9.0)


def test_empty_histogram_has_no_quantile() -> None:
    assert quantile(BOUNDS, [0, 0, 0, 0], 0.5) is None
    assert LatencyHistogram().percentile(0.5) is None


def test_device_histogram_counts_and_summarises() -> None:
    histogram = LatencyHistogram(BOUNDS)
    for value in (0.5, 1.5, 1.5, 3.0, 100.0):
        histogram.add(value)

    assert histogram.counts == [1, 2, 1, 1] and histogram.total == 5
    assert (histogram.min, histogram.max) == (0.5, 100.0)
    assert histogram.percentile(1.0) == pytest.approx(100.0)
    summary = histogram.summary()
    assert summary.bounds_ms == list(BOUNDS) and summary.counts == [1, 2, 1, 1]
    assert summary.p50 == pytest.approx(round(histogram.percentile(0.5), 4))


def test_a_value_on_a_bound_falls_in_that_bound_s_bucket() -> None:
    histogram = LatencyHistogram(BOUNDS)
    histogram.add(2.0)
    assert histogram.counts == [0, 1, 0, 0] and histogram.bucket(2.0) == 1


def test_merged_device_histograms_give_the_pooled_quantile() -> None:
    first, second = LatencyHistogram(BOUNDS), LatencyHistogram(BOUNDS)
    for value in (1.5, 1.5):
        first.add(value)
    for value in (3.0, 3.0):
        second.add(value)

    merged = merge_counts([first.counts, second.counts])

    assert merged == [0, 2, 2, 0]
    assert quantile(BOUNDS, merged, 0.5) == pytest.approx(2.0)
    assert quantile(BOUNDS, merged, 0.75) == pytest.approx(3.0)


def test_from_wire_accepts_both_forms_and_refuses_unusable_ones() -> None:
    assert from_wire([1, 2, 4], [1, 2, 3, 4]) == (BOUNDS, [1, 2, 3, 4])
    assert from_wire([1, 2, 4], [1, 2, 3]) == (BOUNDS, [1, 2, 3, 0])  # sent without the overflow bucket
    for bounds, counts in (([], []), (None, None), ([1, 2], [1]), ([2, 1], [0, 0, 0]), ([1, 2], [1, -1, 0]),
                           ([1, float("nan")], [0, 0, 0]), (["x"], [0, 0]), ([1, 2], None)):
        assert from_wire(bounds, counts) is None, (bounds, counts)
