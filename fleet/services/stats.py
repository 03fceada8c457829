"""Statistics behind the canary gates: one treatment cohort against its control, one test at a time.

    compare_quantile_ratio(t_counts, c_counts, bounds, 0.95, 1.3, "<=", alpha, seed)   p95 ratio, histograms
    compare_proportions(errors_t, n_t, errors_c, n_c, 2.0, 0.001, "<=", alpha)        p_t − F·p_c, error rates
    compare_mean_ratio(t_pairs, c_pairs, 1.5, "<=", alpha, seed)                     ratio of weighted means
    compare_proportion_to_threshold(agreed, samples, 0.98, ">=", alpha)              a proportion, absolute
    histogram_quantiles(counts_matrix, bounds, 0.95)                                 a quantile per row

Each function is a single test at one-sided level `alpha`. The caller (fleet.services.gates) runs at most
LOOKS planned looks per wave and passes ALPHA / LOOKS (Bonferroni), so nothing here corrects for looks.

Reading a `Comparison`. A gate reads `metric OP limit`. `estimate` is the compared parameter (a ratio of
treatment to control, a difference of rates, a proportion), `limit` what it is compared with. `low` and
`high` are the one-sided bounds at level alpha: together, an interval at confidence 1 − 2·alpha. For `<=`
and `<` the good side is below the limit:

    fail          low > limit      the regression beyond the limit is significant (p_value < alpha)
    pass          high < limit     the estimate is significantly on the good side (p_pass < alpha)
    inconclusive  otherwise        the interval holds the limit: more data may decide

`>=` and `>` mirror it (fail when high < limit, pass when low > limit); strict and non-strict ops are
treated alike. The outcome is always read off the interval; `statistic` and the p-values come from the
same normal approximation, so `p_value < alpha` exactly when the outcome is fail and `p_pass < alpha`
exactly when it is pass (up to floating-point rounding at the boundary itself). `statistic` is the z of
the estimate against the limit, signed so that positive points towards fail; `p_value` is the one-sided p
of H0 "no regression beyond the limit" (small: fail), `p_pass` of H0 "regressed at least to the limit"
(small: pass). `reason` is set only when the data cannot decide at all (an empty side, a quantile above
the last histogram bound, a zero control); an inconclusive without `reason` is a plain "not yet
significant either way". `detail` holds the numbers behind the test; `to_evidence()` is the JSON form.

Latency quantiles (compare_quantile_ratio). Each side is a matrix of devices × histogram buckets (each
device's windows summed). The parameter is the ratio of the q-quantiles of the two merged histograms,
with the quantile convention of edgepack.histogram.quantile (linear inside the bucket holding rank
q·total; a rank in the overflow bucket is +inf). Its uncertainty comes from a two-level bootstrap:

  - devices are resampled with replacement within each side (multinomial device weights), because the
    windows and requests of one device are correlated (same unit, same thermal state, same inputs): the
    device, not the request, is the independent unit, and a device that is slow on every window must
    count once, not once per request;
  - the weighted merged bucket counts are then Poisson-resampled (counts* ~ Poisson(Σ_d w_d·c_dk)), so a
    side with few devices still carries the sampling noise of its requests (with a single device the
    device step alone would see no noise at all).

The standard error is the standard deviation of the log ratio over the replicates, and the interval is
normal on the log scale, exp(log(estimate) ± z_{1−alpha}·se), not a percentile interval: at alpha =
0.05/6 a percentile interval reads the 0.8 % tails, a handful of replicates out of a thousand, while the
log ratio of two quantiles is close to normal and its standard deviation is stable with 1000
replicates. The test is the Wald test of log(ratio) = log(factor). Limits: with few devices per side the
device bootstrap underestimates the between-device variation (by a factor (n − 1)/n in variance, and it
cannot see it at all with one device); the Poisson step then gives only the within-device noise. And the
interval covers sampling noise, not the histogram's resolution: inside a bucket (about 21 % wide) the
quantile is interpolated as if the latencies were spread evenly over it, so when a distribution is no
wider than a bucket or two the ratio can be off by a few percent whatever the sample size (lognormal
latencies with σ = 0.1: a true 1.3x reads about 1.25x), more than the interval's width once there are
thousands of requests. With wider distributions (σ ≥ 0.3) that error is small against the noise.
Inconclusive, with a reason, when a side is empty, a quantile lies above the last bucket bound (+inf)
or the control's is 0, or more than 5 % of the replicates give no finite positive ratio (a resampled
quantile in the overflow bucket or a resampled side empty). When every replicate gives the same ratio
(each side's quantile sits alone in one bucket, so the interpolation inside the bucket fixes it), the
normal interval would have width 0 although the data cannot resolve the quantile within its bucket: the
test then takes as interval the ratio's bucket bounds, [lower_t/upper_c, upper_t/lower_c], and decides
from them (no statistic; the p-values are 0 or 1).

Error rates (compare_proportions). The parameter is d = p_t − factor·p_c, compared with an absolute
`allowance` (limit): a control with no error at all would otherwise forbid any error in the treatment.
The interval is MOVER (Zou & Donner 2008) from Wilson score intervals [l, u] of each rate at z_{1−alpha}:

    L = d − sqrt((p_t − l_t)² + factor²·(u_c − p_c)²)      U = d + sqrt((u_t − p_t)² + factor²·(p_c − l_c)²)

With factor 1 this is Newcombe's hybrid score interval (method 10). It behaves well for rare events and
zero counts, where the Wald interval does not. The statistic is (d − allowance)/se with se read from
the side of the interval facing the limit: se = (d − L)/z when d > allowance, (U − d)/z when d <
allowance (their mean when equal); so the normal approximation reproduces the interval's own decision.
Inconclusive, with a reason, when a side served nothing (n = 0).

Drift scores (compare_mean_ratio). Each side is a list of per-device (weighted sum, weight) pairs; the
parameter is the ratio of the weighted means (Σ sums / Σ weights per side). Devices are resampled with
replacement (the same device bootstrap, no Poisson step: the scores are not counts) and the interval is
normal on the log scale, as for latency. Inconclusive, with a reason, when a side is empty or the
control's mean is 0 (both means 0 included). When every replicate gives the same ratio (each device has
its side's mean), the data shows no variability and the test decides from the estimate alone.

Proportion against a threshold (compare_proportion_to_threshold). For an absolute gate such as
`shadow_agreement>=0.98`: the Wilson score interval of p = successes/n at z_{1−alpha}. The Wilson interval
is the inversion of the score test, so the statistic is that test's z, ±(p − threshold)/sqrt(threshold·(1 −
threshold)/n) (signed as above), and agrees with the interval exactly. Inconclusive, with a reason, when
n = 0.

Φ is computed as erfc(−x/√2)/2, which keeps the relative precision of small p-values (statistics.
NormalDist.cdf loses it below about 1e-12 and gives 0 below about 1e-16); Φ⁻¹ is statistics.NormalDist.
inv_cdf. Every resampling function takes `seed` and draws from np.random.default_rng(seed) only, so the
same inputs and seed give the same Comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Outcome = Literal["pass", "fail", "inconclusive"]

OPS = ("<=", "<", ">=", ">")
# The share of bootstrap replicates that may give no finite ratio before the test gives up.
MAX_NONFINITE_SHARE = 0.05
# Replicates whose log ratios spread less than this are taken as "no variability at all".
_DEGENERATE_SPREAD = 1e-9

_STANDARD_NORMAL = NormalDist()


@dataclass(frozen=True)
class Comparison:
    """The result of one test of treatment against control (or of a proportion against a threshold).

    `low`/`high`: the one-sided bounds at level alpha (a 1 − 2·alpha interval); `statistic`: z of the
    estimate against `limit`, positive towards fail; `p_value`: one-sided p of "no regression beyond the
    limit" (small: fail); `p_pass`: one-sided p of "regressed at least to the limit" (small: pass);
    `reason`: why the data cannot decide at all, when it cannot. See the module docstring."""

    method: str
    estimate: float | None
    low: float | None
    high: float | None
    limit: float
    statistic: float | None
    p_value: float | None
    p_pass: float | None
    outcome: Outcome
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_evidence(self) -> dict[str, Any]:
        """A JSON-ready dict: floats rounded to 6 significant digits, non-finite floats and None as None."""
        return {
            "method": self.method, "estimate": _evidence(self.estimate), "low": _evidence(self.low),
            "high": _evidence(self.high), "limit": _evidence(self.limit), "statistic": _evidence(self.statistic),
            "p_value": _evidence(self.p_value), "p_pass": _evidence(self.p_pass), "outcome": self.outcome,
            "reason": self.reason, "detail": _evidence(self.detail),
        }


def _evidence(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, np.bool_)):
        return bool(value) if isinstance(value, np.bool_) else value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _evidence(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_evidence(item) for item in value]
    return str(value)


# ------------------------------------------------------------------ quantiles of histograms


def histogram_quantiles(counts_matrix: Any, bounds: Sequence[float], q: float) -> np.ndarray:
    """The q-quantile of each row of a (B, len(bounds)+1) matrix of bucket counts (last column: overflow).

    Row by row the same number as edgepack.histogram.quantile(bounds, row, q): linear inside the bucket
    holding rank q·total, the first bucket starting at 0; +inf when the rank falls in the overflow bucket;
    nan (there: None) for an empty row."""
    counts = np.asarray(counts_matrix)
    edges = np.asarray(bounds, dtype=np.float64)
    if counts.ndim != 2 or edges.ndim != 1 or counts.shape[1] != edges.size + 1:
        raise ValueError(f"counts must be (rows, {edges.size + 1}) for {edges.size} bounds, got {counts.shape}")
    lower, upper = _bucket_edges(edges)
    return _quantiles(counts, lower, upper, q)


def _bucket_edges(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each bucket's lower and upper edge: the first starts at 0, the overflow bucket ends at +inf."""
    return np.concatenate(([0.0], edges)), np.concatenate((edges, [np.inf]))


def _quantiles(counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, q: float) -> np.ndarray:
    """histogram_quantiles on any subset of the buckets (in order) that holds every non-zero count: the
    buckets left out are empty in every row, so they change nothing. `upper` is +inf for the overflow."""
    rows = counts.shape[0]
    cumulative = np.cumsum(counts, axis=1)
    total = cumulative[:, -1]
    rank = q * total
    holds = (counts != 0) & (cumulative >= rank[:, None])
    found = holds.any(axis=1)
    index = holds.argmax(axis=1)
    take = np.arange(rows)
    count = counts[take, index]
    seen = cumulative[take, index] - count
    low, high = lower[index], upper[index]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = low + (high - low) * np.maximum(rank - seen, 0.0) / count
    value = np.where(found & np.isfinite(high), value, np.inf)
    return np.where(total == 0, np.nan, value).astype(np.float64)


def _bucket_of_quantile(counts: np.ndarray, q: float) -> int:
    """The index of the bucket holding rank q·total of one non-empty histogram (as histogram_quantiles)."""
    cumulative = np.cumsum(counts)
    holds = (counts != 0) & (cumulative >= q * cumulative[-1])
    return int(holds.argmax()) if holds.any() else counts.size - 1


# ------------------------------------------------------------------ the tests


def compare_quantile_ratio(treatment: Any, control: Any, bounds: Sequence[float], q: float, factor: float,
                           op: str, alpha: float, seed: int, resamples: int = 1000) -> Comparison:
    """Ratio of the q-quantiles of the merged treatment and control histograms against `factor`.

    `treatment`/`control`: devices × (len(bounds)+1) bucket counts, each device's windows summed. Device
    bootstrap with Poisson-resampled counts, normal interval on the log scale (see the module docstring).
    `estimate` is quantile_t / quantile_c, `limit` is `factor`."""
    _check(op, alpha)
    _check_positive("factor", factor)
    _check_resamples(resamples)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q!r}")
    edges = np.asarray(bounds, dtype=np.float64)
    if edges.ndim != 1 or edges.size == 0 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ValueError("bounds must be finite and increasing")
    label = f"p{q * 100:g}"
    method = (f"device bootstrap of the {label} ratio (devices resampled, bucket counts Poisson-resampled; "
              "normal interval on log scale)")
    sides = {"treatment": _count_matrix(treatment, edges.size), "control": _count_matrix(control, edges.size)}
    detail: dict[str, Any] = {"q": q}
    for name, counts in sides.items():
        detail[f"{name}_devices"] = int(counts.shape[0])
        detail[f"{name}_inferences"] = int(counts.sum())
    merged = {name: counts.sum(axis=0) for name, counts in sides.items()}
    point = {name: float(histogram_quantiles(row[None, :], edges, q)[0]) for name, row in merged.items()}
    for name in sides:
        detail[f"{name}_quantile_ms"] = None if math.isnan(point[name]) else point[name]

    def undecidable(reason: str) -> Comparison:
        return _undecided(method, factor, reason, detail, estimate=_ratio_or_none(point))

    for name, counts in sides.items():
        if counts.shape[0] == 0:
            return undecidable(f"the {name} has no devices")
        if detail[f"{name}_inferences"] == 0:
            return undecidable(f"the {name}'s latency histograms are empty")
    for name in sides:
        if math.isinf(point[name]):
            return undecidable(f"{name} {label} lies above the last histogram bound ({edges[-1]:g} ms)")
    if point["control"] == 0.0:
        return undecidable(f"control {label} is 0 ms: no ratio")
    estimate = point["treatment"] / point["control"]

    rng = np.random.default_rng(seed)
    lower, upper = _bucket_edges(edges)
    replicate = {}
    for name, counts in sides.items():
        used = merged[name] > 0  # buckets empty on every device of the side stay empty in every replicate
        weights = _device_weights(rng, counts.shape[0], resamples).astype(np.float64)
        expected = weights @ counts[:, used].astype(np.float64)
        replicate[name] = _quantiles(rng.poisson(expected), lower[used], upper[used], q)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = replicate["treatment"] / replicate["control"]
    detail["resamples"] = resamples

    def bucket_bounds() -> tuple[float, float]:
        t = _bucket_of_quantile(merged["treatment"], q)
        c = _bucket_of_quantile(merged["control"], q)
        high = upper[t] / lower[c] if lower[c] > 0 else math.inf
        return float(lower[t] / upper[c]), float(high)

    return _log_ratio_test(method, estimate, ratios, factor, op, alpha, detail, bucket_bounds,
                           degenerate_reason=f"every resample gives the same ratio ({label} of each side alone in "
                                             "one bucket) and the ratio's bucket bounds hold the limit")


def compare_proportions(events_t: int, n_t: int, events_c: int, n_c: int, factor: float, allowance: float,
                        op: str, alpha: float) -> Comparison:
    """d = p_t − factor·p_c against `allowance` (the limit), with a MOVER interval from Wilson intervals.

    With factor 1 the interval is Newcombe's hybrid score interval. `estimate` is d; see the module
    docstring for the statistic."""
    _check(op, alpha)
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"factor must be finite and non-negative, got {factor!r}")
    if not math.isfinite(allowance):
        raise ValueError(f"allowance must be finite, got {allowance!r}")
    for events, n in ((events_t, n_t), (events_c, n_c)):
        if not 0 <= events <= n:
            raise ValueError(f"need 0 <= events <= n, got {events!r} of {n!r}")
    method = "MOVER interval of p_t − F·p_c from Wilson score intervals (Zou & Donner 2008)"
    detail: dict[str, Any] = {"events_t": int(events_t), "n_t": int(n_t), "events_c": int(events_c),
                              "n_c": int(n_c), "factor": factor,
                              "p_t": events_t / n_t if n_t else None, "p_c": events_c / n_c if n_c else None}
    for name, n in (("treatment", n_t), ("control", n_c)):
        if n == 0:
            return _undecided(method, allowance, f"the {name} served no inferences", detail)
    z = _z(alpha)
    p_t, p_c = events_t / n_t, events_c / n_c
    l_t, u_t = _wilson(events_t, n_t, z)
    l_c, u_c = _wilson(events_c, n_c, z)
    d = p_t - factor * p_c
    low = d - math.sqrt((p_t - l_t) ** 2 + factor ** 2 * (u_c - p_c) ** 2)
    high = d + math.sqrt((u_t - p_t) ** 2 + factor ** 2 * (p_c - l_c) ** 2)
    below, above = (d - low) / z, (high - d) / z
    se = below if d > allowance else above if d < allowance else (below + above) / 2
    detail["se"] = se
    return _normal_test(method, d, low, high, allowance, se, op, detail)


def compare_mean_ratio(treatment: Sequence[tuple[float, float]], control: Sequence[tuple[float, float]],
                       factor: float, op: str, alpha: float, seed: int, resamples: int = 1000) -> Comparison:
    """Ratio of weighted means (Σ sums / Σ weights per side) against `factor`: device bootstrap, normal
    interval on the log scale. `treatment`/`control`: per-device (weighted_sum, weight) pairs."""
    _check(op, alpha)
    _check_positive("factor", factor)
    _check_resamples(resamples)
    method = "device bootstrap of the ratio of weighted means (normal interval on log scale)"
    sides = {"treatment": _pairs(treatment), "control": _pairs(control)}
    detail: dict[str, Any] = {}
    means: dict[str, float | None] = {}
    for name, (sums, weights) in sides.items():
        detail[f"{name}_devices"] = int(sums.size)
        detail[f"{name}_weight"] = float(weights.sum())
        means[name] = float(sums.sum() / weights.sum()) if weights.sum() > 0 else None
        detail[f"{name}_mean"] = means[name]

    def undecidable(reason: str) -> Comparison:
        return _undecided(method, factor, reason, detail)

    for name, (sums, weights) in sides.items():
        if sums.size == 0:
            return undecidable(f"the {name} has no devices")
        if weights.sum() <= 0:
            return undecidable(f"the {name}'s weights sum to 0")
    mean_t, mean_c = means["treatment"], means["control"]
    assert mean_t is not None and mean_c is not None
    if mean_c == 0:
        return undecidable("both means are 0: no ratio" if mean_t == 0 else "the control's mean is 0: no ratio")
    estimate = mean_t / mean_c
    if estimate < 0:
        return undecidable("the means have opposite signs: no ratio on the log scale")

    rng = np.random.default_rng(seed)
    replicate = {}
    for name, (sums, weights) in sides.items():
        device_weights = _device_weights(rng, sums.size, resamples).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            replicate[name] = (device_weights @ sums) / (device_weights @ weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = replicate["treatment"] / replicate["control"]
    detail["resamples"] = resamples
    return _log_ratio_test(method, estimate, ratios, factor, op, alpha, detail, None,
                           degenerate_reason="every resample gives the same ratio and it equals the limit")


def compare_proportion_to_threshold(successes: int, n: int, threshold: float, op: str, alpha: float) -> Comparison:
    """A proportion successes/n against `threshold` (the limit): Wilson score interval and score test."""
    _check(op, alpha)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes!r} of {n!r}")
    method = "Wilson score interval of a proportion against a threshold (score test)"
    detail: dict[str, Any] = {"successes": int(successes), "n": int(n)}
    if n == 0:
        return _undecided(method, threshold, "no samples (n = 0)", detail)
    z = _z(alpha)
    p = successes / n
    low, high = _wilson(successes, n, z)
    se = math.sqrt(threshold * (1.0 - threshold) / n)
    detail["se_at_threshold"] = se
    return _normal_test(method, p, low, high, threshold, se, op, detail)


# ------------------------------------------------------------------ shared pieces


def _check(op: str, alpha: float) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha!r}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and positive, got {value!r}")


def _check_resamples(resamples: int) -> None:
    if resamples < 2:
        raise ValueError(f"resamples must be at least 2, got {resamples!r}")


def _z(alpha: float) -> float:
    return _STANDARD_NORMAL.inv_cdf(1.0 - alpha)


def _phi(x: float) -> float:
    """Φ(x), with full relative precision in the lower tail."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _good_below(op: str) -> bool:
    return op in ("<=", "<")


def _outcome(low: float, high: float, limit: float, op: str) -> Outcome:
    if _good_below(op):
        return "fail" if low > limit else "pass" if high < limit else "inconclusive"
    return "fail" if high < limit else "pass" if low > limit else "inconclusive"


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of successes/n at z (each bound one-sided at Φ(−z))."""
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _count_matrix(counts: Any, buckets: int) -> np.ndarray:
    matrix = np.asarray(counts)
    if matrix.size == 0:
        return np.zeros((0, buckets + 1), dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[1] != buckets + 1:
        raise ValueError(f"counts must be (devices, {buckets + 1}), got {matrix.shape}")
    if np.any(matrix < 0):
        raise ValueError("counts must not be negative")
    return matrix.astype(np.int64)


def _pairs(pairs: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(list(pairs), dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(array)) or np.any(array[:, 1] < 0):
        raise ValueError("(weighted_sum, weight) pairs must be finite with non-negative weights")
    return array[:, 0].copy(), array[:, 1].copy()


def _device_weights(rng: np.random.Generator, devices: int, resamples: int) -> np.ndarray:
    """(resamples, devices) multinomial weights: how often each device is drawn, `devices` draws per row."""
    picks = rng.integers(0, devices, size=(resamples, devices))
    picks += np.arange(resamples)[:, None] * devices  # row b counts in [b·devices, (b+1)·devices)
    return np.bincount(picks.ravel(), minlength=resamples * devices).reshape(resamples, devices)


def _ratio_or_none(point: Mapping[str, float]) -> float | None:
    t, c = point["treatment"], point["control"]
    if math.isfinite(t) and math.isfinite(c) and c > 0:
        return t / c
    return None


def _undecided(method: str, limit: float, reason: str, detail: dict[str, Any],
               estimate: float | None = None) -> Comparison:
    return Comparison(method=method, estimate=estimate, low=None, high=None, limit=limit, statistic=None,
                      p_value=None, p_pass=None, outcome="inconclusive", reason=reason, detail=detail)


def _normal_test(method: str, estimate: float, low: float, high: float, limit: float, se: float, op: str,
                 detail: dict[str, Any], *, log_scale: bool = False, reason: str | None = None) -> Comparison:
    """The Comparison of an interval [low, high] around `estimate` with standard error `se` (on the log
    scale when `log_scale`): outcome from the interval, statistic and p-values from the same normal."""
    outcome = _outcome(low, high, limit, op)
    sign = 1.0 if _good_below(op) else -1.0
    centre, against = (math.log(estimate), math.log(limit)) if log_scale else (estimate, limit)
    if se > 0:
        statistic: float | None = sign * (centre - against) / se
        p_value, p_pass = _phi(-statistic), _phi(statistic)
    else:  # no sampling variability: each test rejects for certain or not at all
        statistic = None
        p_value, p_pass = (0.0 if outcome == "fail" else 1.0), (0.0 if outcome == "pass" else 1.0)
    return Comparison(method=method, estimate=estimate, low=low, high=high, limit=limit, statistic=statistic,
                      p_value=p_value, p_pass=p_pass, outcome=outcome,
                      reason=reason if outcome == "inconclusive" else None, detail=detail)


def _log_ratio_test(method: str, estimate: float, ratios: np.ndarray, factor: float, op: str, alpha: float,
                    detail: dict[str, Any], degenerate_bounds: Callable[[], tuple[float, float]] | None,
                    degenerate_reason: str) -> Comparison:
    """Normal interval for log(ratio) with the bootstrap replicates' standard deviation as se."""
    usable = np.isfinite(ratios) & (ratios > 0)
    detail["finite_resamples"] = int(usable.sum())
    if estimate == 0.0 and np.all(ratios == 0.0):
        # the treatment side is 0 in every replicate: no variability, the ratio is 0
        detail["se_log"] = 0.0
        return _normal_test(method + "; degenerate: the ratio is 0 in every resample", 0.0, 0.0, 0.0, factor,
                            0.0, op, detail)
    if estimate <= 0.0:
        return _undecided(method, factor, "the treatment's side is 0 but not in every resample: no ratio on the "
                                          "log scale", detail, estimate=estimate)
    share = 1.0 - usable.mean()
    if share > MAX_NONFINITE_SHARE:
        return _undecided(method, factor, f"{share:.1%} of the resamples give no finite positive ratio "
                                          f"(more than {MAX_NONFINITE_SHARE:.0%})", detail, estimate=estimate)
    logs = np.log(ratios[usable])
    if np.ptp(logs) <= _DEGENERATE_SPREAD:
        detail["se_log"] = 0.0
        low, high = degenerate_bounds() if degenerate_bounds else (estimate, estimate)
        suffix = "; degenerate: every resample gives the same ratio, decided on " + (
            "its bucket bounds" if degenerate_bounds else "the estimate")
        return _normal_test(method + suffix, estimate, low, high, factor, 0.0, op, detail, log_scale=True,
                            reason=degenerate_reason)
    se = float(np.std(logs, ddof=1))
    detail["se_log"] = se
    half = _z(alpha) * se
    centre = math.log(estimate)
    return _normal_test(method, estimate, math.exp(centre - half), math.exp(centre + half), factor, se, op,
                        detail, log_scale=True)


__all__ = [
    "Comparison", "MAX_NONFINITE_SHARE", "OPS", "Outcome", "compare_mean_ratio", "compare_proportion_to_threshold",
    "compare_proportions", "compare_quantile_ratio", "histogram_quantiles",
]
