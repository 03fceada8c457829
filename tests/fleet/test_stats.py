"""fleet.services.stats: the canary gates' tests, against published numbers and synthetic cohorts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgepack.histogram import LATENCY_BOUNDS_MS, quantile
from fleet.services.stats import (
    Comparison, compare_mean_ratio, compare_proportion_to_threshold, compare_proportions, compare_quantile_ratio,
    histogram_quantiles,
)

BOUNDS = np.asarray(LATENCY_BOUNDS_MS)
BUCKETS = len(LATENCY_BOUNDS_MS) + 1
LOOK_ALPHA = 0.05 / 6  # what fleet.services.gates passes: ALPHA / LOOKS


def histograms(rng: np.random.Generator, devices: int, samples: int, median: float = 60.0, sigma: float = 0.1,
               slowdown: float = 1.0) -> np.ndarray:
    """devices × buckets counts of lognormal latencies, binned as LatencyHistogram.add bins them."""
    latencies = rng.lognormal(math.log(median * slowdown), sigma, size=(devices, samples))
    index = np.searchsorted(BOUNDS, latencies, side="left") + np.arange(devices)[:, None] * BUCKETS
    return np.bincount(index.ravel(), minlength=devices * BUCKETS).reshape(devices, BUCKETS)


def outcomes(slowdown: float, alpha: float, *, treatment: tuple[int, int] = (3, 200),
             control: tuple[int, int] = (27, 200), sigma: float = 0.1, seeds: int = 200,
             factor: float = 1.3) -> dict[str, int]:
    """Outcomes of the p95 gate `<= factor x control` over `seeds` synthetic cohorts (devices, samples each)."""
    tally = {"pass": 0, "fail": 0, "inconclusive": 0}
    for seed in range(seeds):
        rng = np.random.default_rng(10_000 + seed)
        t = histograms(rng, *treatment, sigma=sigma, slowdown=slowdown)
        c = histograms(rng, *control, sigma=sigma)
        tally[compare_quantile_ratio(t, c, LATENCY_BOUNDS_MS, 0.95, factor, "<=", alpha, seed).outcome] += 1
    return tally


def assert_consistent(comparison: Comparison, alpha: float) -> None:
    """The outcome agrees with the interval and with both p-values."""
    assert comparison.low is not None and comparison.high is not None
    assert comparison.low <= comparison.estimate <= comparison.high
    assert (comparison.outcome == "fail") == (comparison.p_value < alpha)
    assert (comparison.outcome == "pass") == (comparison.p_pass < alpha)


# ------------------------------------------------------------------ histogram quantiles


def test_histogram_quantiles_equal_the_reference_row_by_row():
    rng = np.random.default_rng(7)
    rows = []
    for i in range(200):
        row = np.zeros(BUCKETS, dtype=np.int64)
        if i % 20 == 0:
            rows.append(row)  # empty: nan
            continue
        buckets = rng.choice(BUCKETS, size=rng.integers(1, 8), replace=False)
        row[buckets] = rng.integers(0, 50, size=buckets.size)
        if i % 7 == 0:
            row[-1] += rng.integers(1, 200)  # heavy overflow: high ranks land there (inf)
        rows.append(row)
    matrix = np.stack(rows)
    seen_inf = seen_nan = 0
    for q in (0.0, 0.05, 0.5, 0.95, 0.99, 1.0):
        got = histogram_quantiles(matrix, LATENCY_BOUNDS_MS, q)
        expected = [quantile(LATENCY_BOUNDS_MS, row.tolist(), q) for row in matrix]
        expected = np.array([math.nan if value is None else value for value in expected])
        np.testing.assert_array_equal(got, expected)  # exactly, nan and inf included
        seen_inf += int(np.isinf(got).sum())
        seen_nan += int(np.isnan(got).sum())
    assert seen_inf > 20 and seen_nan == 6 * 10


def test_histogram_quantiles_on_small_bounds_and_shape_errors():
    counts = np.array([[0, 2, 2, 0], [4, 0, 0, 0], [0, 0, 0, 3], [1, 1, 1, 1]])
    got = histogram_quantiles(counts, (1.0, 2.0, 4.0), 0.5)
    assert got.tolist() == [2.0, 0.5, math.inf, 2.0]
    with pytest.raises(ValueError):
        histogram_quantiles(counts, (1.0, 2.0), 0.5)


# ------------------------------------------------------------------ error rates


def test_compare_proportions_reproduces_newcombes_example():
    # Newcombe (1998), method 10, 56/70 vs 48/80: difference 0.2000, 95 % interval 0.0524 to 0.3339
    result = compare_proportions(56, 70, 48, 80, factor=1.0, allowance=0.0, op="<=", alpha=0.025)

    assert result.estimate == pytest.approx(0.2)
    assert result.low == pytest.approx(0.0524, abs=5e-5)
    assert result.high == pytest.approx(0.3339, abs=5e-5)
    assert result.limit == 0.0
    assert result.outcome == "fail"  # the interval lies above 0
    assert result.statistic == pytest.approx(2.6563, abs=1e-4)  # se from the side facing the limit: (d − L)/z
    assert result.p_value == pytest.approx(0.00395, abs=1e-5)
    assert result.detail["p_t"] == 0.8 and result.detail["p_c"] == 0.6
    assert_consistent(result, 0.025)


def test_compare_proportions_zero_errors_on_both_sides_is_inconclusive():
    result = compare_proportions(0, 1000, 0, 1000, factor=1.0, allowance=0.001, op="<=", alpha=0.025)

    assert result.estimate == 0.0
    # MOVER at p = 0: ±(Wilson upper bound of 0/1000) = ±z²/(n + z²) = ±3.8415/1003.8415
    assert result.low == pytest.approx(-0.0038268, abs=1e-7)
    assert result.high == pytest.approx(0.0038268, abs=1e-7)
    assert result.outcome == "inconclusive" and result.reason is None
    assert_consistent(result, 0.025)


def test_compare_proportions_clear_increase_fails_and_clear_calm_passes():
    worse = compare_proportions(50, 1000, 10, 1000, factor=1.5, allowance=0.001, op="<=", alpha=LOOK_ALPHA)
    assert worse.estimate == pytest.approx(0.035)
    assert worse.outcome == "fail" and worse.low > 0.001
    assert worse.p_value < 1e-3 and worse.statistic > 3
    assert_consistent(worse, LOOK_ALPHA)

    calm = compare_proportions(10, 100_000, 10, 100_000, factor=1.5, allowance=0.001, op="<=", alpha=LOOK_ALPHA)
    assert calm.outcome == "pass" and calm.high < 0.001
    assert_consistent(calm, LOOK_ALPHA)


def test_compare_proportions_needs_both_sides():
    result = compare_proportions(3, 100, 0, 0, factor=1.0, allowance=0.001, op="<=", alpha=0.01)
    assert result.outcome == "inconclusive"
    assert result.reason == "the control served no inferences"
    assert result.low is None and result.p_value is None


# ------------------------------------------------------------------ latency quantile ratio: calibration


def test_no_difference_passes_and_almost_never_fails():
    tally = outcomes(1.0, 0.01)
    assert tally["fail"] <= 2
    assert tally["pass"] >= 180


def test_a_true_one_and_a_half_times_slowdown_fails():
    assert outcomes(1.5, 0.01)["fail"] >= 190


def test_a_true_ten_percent_slowdown_never_fails_against_thirty_percent():
    tally = outcomes(1.1, 0.01)
    assert tally["fail"] == 0
    assert tally["pass"] >= 180


def test_a_slowdown_exactly_at_the_threshold_rarely_decides_either_way():
    # sigma 0.3: the latencies spread over a few buckets, so the interpolation inside a bucket is not what
    # decides (with sigma 0.1, narrower than a bucket, a true 1.3x reads about 1.25x: see the docstring)
    tally = outcomes(1.3, 0.05, sigma=0.3)
    assert tally["fail"] <= 20  # ≤ 0.1 of 200 (nominally 0.05)
    assert tally["pass"] <= 20


def test_one_device_of_ten_requests_per_side_does_not_decide_a_wide_distribution():
    tally = outcomes(1.0, LOOK_ALPHA, treatment=(1, 10), control=(1, 10), sigma=0.3)
    assert tally["fail"] == 0
    assert tally["inconclusive"] >= 100



# ------------------------------------------------------------------ latency quantile ratio: the numbers


def test_quantile_ratio_numbers_and_detail():
    rng = np.random.default_rng(3)
    t = histograms(rng, 3, 200, slowdown=1.5)
    c = histograms(rng, 27, 200)
    result = compare_quantile_ratio(t, c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", LOOK_ALPHA, seed=11)

    detail = result.detail
    assert detail["treatment_devices"] == 3 and detail["control_devices"] == 27
    assert detail["treatment_inferences"] == 600 and detail["control_inferences"] == 5400
    assert detail["resamples"] == 1000 and detail["finite_resamples"] == 1000
    merged_t = quantile(LATENCY_BOUNDS_MS, t.sum(axis=0).tolist(), 0.95)
    merged_c = quantile(LATENCY_BOUNDS_MS, c.sum(axis=0).tolist(), 0.95)
    assert detail["treatment_quantile_ms"] == merged_t and detail["control_quantile_ms"] == merged_c
    assert result.estimate == pytest.approx(merged_t / merged_c)
    assert 1.4 < result.estimate < 1.6
    assert 0 < detail["se_log"] < 0.05
    z = 2.3939797998185104  # Φ⁻¹(1 − 0.05/6)
    assert result.low == pytest.approx(result.estimate * math.exp(-z * detail["se_log"]))
    assert result.high == pytest.approx(result.estimate * math.exp(z * detail["se_log"]))
    assert result.statistic == pytest.approx((math.log(result.estimate) - math.log(1.3)) / detail["se_log"])
    assert result.outcome == "fail" and result.limit == 1.3
    assert_consistent(result, LOOK_ALPHA)


def test_quantile_ratio_mirrors_for_greater_or_equal():
    rng = np.random.default_rng(4)
    c = histograms(rng, 20, 200)
    same = compare_quantile_ratio(histograms(rng, 5, 200), c, LATENCY_BOUNDS_MS, 0.5, 0.8, ">=", 0.01, 1)
    low_t = histograms(rng, 5, 200, slowdown=0.6)
    lower = compare_quantile_ratio(low_t, c, LATENCY_BOUNDS_MS, 0.5, 0.8, ">=", 0.01, 1)

    assert same.outcome == "pass" and same.low > 0.8 and same.statistic < 0
    assert lower.outcome == "fail" and lower.high < 0.8 and lower.statistic > 0
    assert_consistent(same, 0.01)
    assert_consistent(lower, 0.01)


def test_quantile_ratio_cannot_decide_without_data():
    rng = np.random.default_rng(5)
    c = histograms(rng, 5, 100)
    empty_side = compare_quantile_ratio(np.zeros((0, BUCKETS), int), c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 0)
    assert empty_side.outcome == "inconclusive" and empty_side.reason == "the treatment has no devices"

    empty_counts = compare_quantile_ratio(np.zeros((2, BUCKETS), int), c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 0)
    assert empty_counts.reason == "the treatment's latency histograms are empty"

    above = c.copy()
    above[:, -1] += 100  # more than 5 % of the control above the last bound: its p95 is +inf
    overflow = compare_quantile_ratio(c, above, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 0)
    assert overflow.outcome == "inconclusive"
    assert overflow.reason == "control p95 lies above the last histogram bound (10000 ms)"
    assert overflow.detail["control_quantile_ms"] == math.inf and overflow.estimate is None

    single = np.zeros((1, BUCKETS), int)
    single[0, 38] = 1  # one request: a third of its Poisson resamples are empty
    sparse = compare_quantile_ratio(c, single, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 0)
    assert sparse.outcome == "inconclusive"
    assert sparse.reason.endswith("of the resamples give no finite positive ratio (more than 5%)")
    assert 0.3 < 1 - sparse.detail["finite_resamples"] / 1000 < 0.45


def test_quantile_ratio_with_every_quantile_alone_in_one_bucket_decides_on_bucket_bounds():
    control = np.zeros((3, BUCKETS), int)
    control[:, 38] = 40  # 64.9 to 78.78 ms
    same_bucket = np.zeros((2, BUCKETS), int)
    same_bucket[:, 38] = 50
    result = compare_quantile_ratio(same_bucket, control, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 0)
    # each quantile sits at the same place in the same bucket in every resample: the ratio is 1 in all of
    # them, and the true ratio lies within 64.9/78.78 .. 78.78/64.9 — below 1.3
    assert result.estimate == 1.0 and result.detail["se_log"] == 0.0
    assert result.low == pytest.approx(64.9 / 78.78) and result.high == pytest.approx(78.78 / 64.9)
    assert result.outcome == "pass" and result.statistic is None
    assert (result.p_value, result.p_pass) == (1.0, 0.0)

    two_up = np.zeros((2, BUCKETS), int)
    two_up[:, 40] = 50  # 95.62 to 116.1 ms: the ratio lies within 95.62/78.78 .. 116.1/64.9, around 1.3
    straddles = compare_quantile_ratio(two_up, control, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 0)
    assert straddles.outcome == "inconclusive" and "bucket bounds hold the limit" in straddles.reason
    assert straddles.low == pytest.approx(95.62 / 78.78) and straddles.high == pytest.approx(116.1 / 64.9)


# ------------------------------------------------------------------ mean ratio (drift)


def drift_pairs(rng: np.random.Generator, devices: int, mean: float, spread: float = 0.1,
                weight: int = 100) -> list[tuple[float, float]]:
    return [(float(score) * weight, float(weight)) for score in rng.normal(mean, spread * mean, size=devices)]


def test_compare_mean_ratio_pass_fail_and_inconclusive():
    rng = np.random.default_rng(8)
    control = drift_pairs(rng, 30, 0.1)

    calm = compare_mean_ratio(drift_pairs(rng, 10, 0.1), control, 1.5, "<=", LOOK_ALPHA, seed=1)
    assert calm.outcome == "pass" and calm.high < 1.5 and 0.9 < calm.estimate < 1.1
    assert_consistent(calm, LOOK_ALPHA)

    drifted = compare_mean_ratio(drift_pairs(rng, 10, 0.3), control, 1.5, "<=", LOOK_ALPHA, seed=1)
    assert drifted.outcome == "fail" and drifted.low > 1.5 and 2.7 < drifted.estimate < 3.3
    assert_consistent(drifted, LOOK_ALPHA)

    noisy = compare_mean_ratio(drift_pairs(rng, 3, 0.15, spread=0.6), drift_pairs(rng, 3, 0.1, spread=0.6),
                               1.5, "<=", LOOK_ALPHA, seed=1)
    assert noisy.outcome == "inconclusive" and noisy.reason is None
    assert noisy.low < 1.5 < noisy.high
    assert_consistent(noisy, LOOK_ALPHA)

    detail = drifted.detail
    assert detail["treatment_devices"] == 10 and detail["control_devices"] == 30
    assert detail["treatment_weight"] == 1000.0 and detail["resamples"] == 1000
    assert drifted.estimate == pytest.approx(detail["treatment_mean"] / detail["control_mean"])


def test_compare_mean_ratio_weights_the_means():
    # Σ sums / Σ weights: (1 + 9) / (10 + 10) = 0.5 against (2 + 2) / (10 + 10) = 0.2
    result = compare_mean_ratio([(1.0, 10.0), (9.0, 10.0)], [(2.0, 10.0), (2.0, 10.0)], 2.0, "<=", 0.05, seed=0)
    assert result.estimate == pytest.approx(2.5)
    assert result.detail["treatment_mean"] == pytest.approx(0.5)
    assert result.detail["control_mean"] == pytest.approx(0.2)
    # the control's devices agree exactly, so all the spread is the treatment's: log 0.1/0.9 apart
    assert result.detail["se_log"] > 0.5 and result.outcome == "inconclusive"


def test_compare_mean_ratio_cannot_decide_without_a_control_mean():
    rng = np.random.default_rng(9)
    t = drift_pairs(rng, 5, 0.1)
    assert compare_mean_ratio(t, [], 1.5, "<=", 0.01, 0).reason == "the control has no devices"
    assert compare_mean_ratio([], t, 1.5, "<=", 0.01, 0).reason == "the treatment has no devices"
    zero = [(0.0, 100.0)] * 4
    assert compare_mean_ratio(t, zero, 1.5, "<=", 0.01, 0).reason == "the control's mean is 0: no ratio"
    both = compare_mean_ratio(zero, zero, 1.5, "<=", 0.01, 0)
    assert both.outcome == "inconclusive" and both.reason == "both means are 0: no ratio"


def test_compare_mean_ratio_with_identical_devices_decides_on_the_estimate():
    same = compare_mean_ratio([(5.0, 10.0)] * 3, [(5.0, 10.0)] * 4, 1.5, "<=", 0.01, 0)
    assert same.estimate == 1.0 and same.detail["se_log"] == 0.0
    assert same.outcome == "pass" and same.statistic is None and same.low == same.high == 1.0


# ------------------------------------------------------------------ proportion against a threshold


def test_compare_proportion_to_threshold():
    clears = compare_proportion_to_threshold(995, 1000, 0.98, ">=", LOOK_ALPHA)
    assert clears.outcome == "pass" and clears.low > 0.98
    assert clears.estimate == 0.995
    assert_consistent(clears, LOOK_ALPHA)

    short = compare_proportion_to_threshold(950, 1000, 0.98, ">=", LOOK_ALPHA)
    assert short.outcome == "fail" and short.high < 0.98 and short.statistic > 0
    # the score test at the threshold: (0.98 − 0.95) / sqrt(0.98·0.02/1000)
    assert short.statistic == pytest.approx(0.03 / math.sqrt(0.98 * 0.02 / 1000))
    assert_consistent(short, LOOK_ALPHA)

    close = compare_proportion_to_threshold(98, 100, 0.98, ">=", LOOK_ALPHA)
    assert close.outcome == "inconclusive" and close.reason is None
    assert close.low < 0.98 < close.high

    nothing = compare_proportion_to_threshold(0, 0, 0.98, ">=", LOOK_ALPHA)
    assert nothing.outcome == "inconclusive" and nothing.reason == "no samples (n = 0)"


def test_wilson_interval_matches_the_textbook_value():
    # Newcombe (1998), method 3, 81/263: 95 % interval 0.2553 to 0.3662
    result = compare_proportion_to_threshold(81, 263, 0.5, "<=", 0.025)
    assert result.low == pytest.approx(0.2553, abs=5e-5)
    assert result.high == pytest.approx(0.3662, abs=5e-5)
    assert result.outcome == "pass"


def test_score_test_agrees_with_the_wilson_interval_on_a_grid():
    for n in (20, 100, 1000):
        for successes in range(0, n + 1, max(1, n // 20)):
            for threshold in (0.05, 0.5, 0.9, 0.98):
                for op in ("<=", ">="):
                    assert_consistent(compare_proportion_to_threshold(successes, n, threshold, op, 0.01), 0.01)


# ------------------------------------------------------------------ determinism, evidence, arguments


def test_the_same_seed_gives_the_same_comparison():
    rng = np.random.default_rng(12)
    t, c = histograms(rng, 4, 150, slowdown=1.2), histograms(rng, 12, 150)
    first = compare_quantile_ratio(t, c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", LOOK_ALPHA, seed=42)
    assert compare_quantile_ratio(t, c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", LOOK_ALPHA, seed=42) == first
    other = compare_quantile_ratio(t, c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", LOOK_ALPHA, seed=43)
    assert other.detail["se_log"] != first.detail["se_log"]

    pairs_t, pairs_c = drift_pairs(rng, 5, 0.2), drift_pairs(rng, 5, 0.1)
    assert (compare_mean_ratio(pairs_t, pairs_c, 1.5, "<=", 0.01, seed=7)
            == compare_mean_ratio(pairs_t, pairs_c, 1.5, "<=", 0.01, seed=7))


def test_to_evidence_is_json_ready():
    rng = np.random.default_rng(13)
    result = compare_quantile_ratio(histograms(rng, 3, 200), histograms(rng, 9, 200), LATENCY_BOUNDS_MS, 0.95, 1.3,
                                    "<=", LOOK_ALPHA, seed=1)
    evidence = result.to_evidence()
    assert json.loads(json.dumps(evidence, allow_nan=False)) == evidence
    assert evidence["outcome"] == result.outcome and evidence["reason"] is None
    assert evidence["estimate"] == float(f"{result.estimate:.6g}")
    assert evidence["detail"]["se_log"] == float(f"{result.detail['se_log']:.6g}")
    assert evidence["detail"]["treatment_devices"] == 3

    c = histograms(rng, 3, 100)
    c[:, -1] += 50
    undecided = compare_quantile_ratio(histograms(rng, 3, 100), c, LATENCY_BOUNDS_MS, 0.95, 1.3, "<=", 0.01, 1)
    evidence = undecided.to_evidence()
    json.dumps(evidence, allow_nan=False)
    assert evidence["low"] is None and evidence["p_value"] is None
    assert evidence["detail"]["control_quantile_ms"] is None  # +inf has no JSON form
    assert evidence["reason"].startswith("control p95 lies above the last histogram bound")


def test_comparison_is_frozen():
    result = compare_proportion_to_threshold(5, 10, 0.5, ">=", 0.05)
    with pytest.raises(AttributeError):
        result.outcome = "pass"  # type: ignore[misc]


@pytest.mark.parametrize("call", [
    lambda: compare_proportions(1, 10, 1, 10, 1.0, 0.0, "==", 0.05),
    lambda: compare_proportions(1, 10, 1, 10, 1.0, 0.0, "<=", 0.0),
    lambda: compare_proportions(11, 10, 1, 10, 1.0, 0.0, "<=", 0.05),
    lambda: compare_proportion_to_threshold(1, 10, 1.5, ">=", 0.05),
    lambda: compare_mean_ratio([(1.0, 1.0)], [(1.0, 1.0)], 0.0, "<=", 0.05, 0),
    lambda: compare_quantile_ratio(np.ones((1, 3)), np.ones((1, 3)), (1.0, 2.0), 0.95, 1.3, "<=", 0.6, 0),
    lambda: compare_quantile_ratio(np.ones((1, 4)), np.ones((1, 4)), (1.0, 2.0), 0.95, 1.3, "<=", 0.05, 0),
])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
