"""Drift: PSI of live inputs and outputs against a real bundle's reference/stats.json."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import onnxruntime
import pytest

from device_agent.drift import MAJOR, MODERATE, DriftMonitor, population_stability_index
from edgepack.clock import FakeClock
from tests.device_agent.agent_harness import VAL_INPUTS, agents, install  # noqa: F401 - agents is a fixture
from tests.device_agent.conftest import DIGITS_CONFIG

CALIB_INPUTS = np.load(DIGITS_CONFIG.parent / "data" / "calib.npz")["input"].astype(np.float32)


@pytest.fixture(scope="module")
def digits_session():
    return onnxruntime.InferenceSession(str(DIGITS_CONFIG.parent / "model.onnx"), providers=["CPUExecutionProvider"])


def reference_of(bundle) -> dict:
    with tarfile.open(bundle.path) as tar:
        return json.loads(tar.extractfile("reference/stats.json").read())


def feed(monitor: DriftMonitor, session, inputs: np.ndarray) -> None:
    for sample in inputs:
        request = {"input": sample[None]}
        (logits,) = session.run(["logits"], request)
        monitor.observe(request, {"logits": logits})


def test_psi_is_zero_for_equal_distributions_and_matches_the_formula():
    expected = np.full(10, 0.1)
    assert population_stability_index(expected * 500, expected) == pytest.approx(0.0, abs=1e-12)
    actual = np.array([0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0])
    manual = sum((a - e) * np.log(a / e) for a, e in zip(np.maximum(actual, 1e-4), expected))
    assert population_stability_index(actual, expected) == pytest.approx(manual)
    with pytest.raises(ValueError):
        population_stability_index(np.zeros(10), expected)


def test_data_like_the_reference_scores_near_zero_and_shifted_data_scores_major(bundles, digits_session):
    reference = reference_of(bundles.v1)
    assert reference["method"] == "psi" and set(reference["inputs"]) == {"input"} and set(reference["outputs"]) == {"logits"}

    same = DriftMonitor(reference, seed=1)
    feed(same, digits_session, VAL_INPUTS)  # the very data the reference was computed from
    fresh = DriftMonitor(reference, seed=1)
    feed(fresh, digits_session, CALIB_INPUTS)  # another sample of the same distribution
    shifted = DriftMonitor(reference, seed=1)
    feed(shifted, digits_session, np.clip(VAL_INPUTS * 0.6 + 0.35, 0, 1))  # washed-out images: brighter, less contrast

    same_scores, fresh_scores, shifted_scores = same.scores(), fresh.scores(), shifted.scores()
    assert set(same_scores) == {"input", "logits"}
    # Reference outputs came from the int8 tflite model; the live outputs here from the float ONNX one.
    assert same_scores["input"] < 0.01 and same_scores["logits"] < MODERATE, same_scores
    assert max(fresh_scores.values()) < MODERATE, fresh_scores
    assert shifted_scores["input"] > MAJOR and shifted_scores["logits"] > MODERATE, shifted_scores


def test_scores_need_enough_values_and_reset_per_window(bundles):
    monitor = DriftMonitor(reference_of(bundles.v1), min_values=100, min_requests=1)
    logits = {"logits": np.zeros((1, 10), np.float32)}
    monitor.observe({"input": VAL_INPUTS[0][None]}, logits)
    assert monitor.scores(reset=False) == {}  # 64 pixels and 10 logits: too few to score
    monitor.observe({"input": VAL_INPUTS[1][None]}, logits)
    assert set(monitor.scores()) == {"input"}  # 128 pixels; still only 20 logits
    assert monitor.scores() == {} and all(c.sum() == 0 for c in monitor.counts().values())


def test_a_window_of_too_few_requests_is_not_scored_even_with_enough_values(bundles):
    """One image's 64 pixels are not 64 independent draws: PSI over one or two images of unchanged data
    can exceed the alert threshold, so a window needs `min_requests` requests before it is scored."""
    reference = reference_of(bundles.v1)
    rng = np.random.default_rng(0)
    one_image = []
    for _ in range(200):
        monitor = DriftMonitor(reference, min_values=1, min_requests=1)
        monitor.observe({"input": VAL_INPUTS[rng.integers(len(VAL_INPUTS))][None]})
        one_image.append(monitor.scores()["input"])
    assert max(one_image) > MODERATE  # the noise the minimum guards against

    monitor = DriftMonitor(reference)  # defaults: 100 values from 5 requests
    for index in range(4):
        monitor.observe({"input": VAL_INPUTS[index:index + 2]})  # 128 values per request: enough values
    assert "input" not in monitor.scores(reset=False)
    monitor.observe({"input": VAL_INPUTS[4:6]})
    assert monitor.scores()["input"] < MODERATE


def test_big_tensors_are_subsampled_and_odd_values_ignored(bundles):
    monitor = DriftMonitor(reference_of(bundles.v1), max_values=4096, seed=3)
    monitor.observe({"input": np.random.default_rng(0).random((64, 1, 64, 64), dtype=np.float32)})
    assert monitor.counts()["input"].sum() == 4096

    monitor.scores()
    monitor.observe({"input": np.array([np.nan, np.inf, 0.5], np.float32), "unknown": np.ones(3)},
                    {"logits": np.array(["a", "b"])})
    counts = monitor.counts()
    assert counts["input"].sum() == 1 and counts["logits"].sum() == 0


def test_a_busy_device_bins_requests_spread_over_time_instead_of_all(bundles):
    clock = FakeClock()
    monitor = DriftMonitor(reference_of(bundles.v1), min_interval_s=0.05, clock=clock)
    request = {"input": VAL_INPUTS[:1]}
    taken = sum(monitor.observe(request) for _ in range(2000))  # a burst: no time passes between them
    assert taken == 1 and monitor.skipped_requests == 1999
    clock.advance(0.049)
    assert not monitor.observe(request)  # still inside the interval
    clock.advance(0.002)
    assert monitor.observe(request)  # the next request after the interval is binned again
    assert monitor.counts()["input"].sum() == 2 * VAL_INPUTS[:1].size


def test_the_agent_reports_drift_of_live_traffic_per_window(agents, mosquitto, bundles):
    clock = FakeClock()  # windows close here, with flush_window, never on their own in the middle of serve()
    agent, statuses, telemetry = agents(telemetry={"window_s": 1.0}, clock=clock)
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    spacing = 1.05 / 256  # drift bins at most one request per window_s / 256: space them out (200 of them: 0.82 s)

    def serve(inputs: np.ndarray) -> None:
        for sample in inputs:
            agent.infer({"input": sample[None]})
            clock.advance(spacing)

    agent.telemetry.flush_window()
    serve(VAL_INPUTS[:100])
    normal = agent.telemetry.flush_window()
    serve(np.clip(VAL_INPUTS[:100] * 0.6 + 0.35, 0, 1))
    drifted = agent.telemetry.flush_window()

    assert normal.inferences == drifted.inferences == 100 and agent.telemetry.window_s == 1.0
    assert normal.drift_method == drifted.drift_method == "psi"
    assert normal.drift["input"] < MODERATE and drifted.drift["input"] > MAJOR, (normal.drift, drifted.drift)
    published = telemetry.wait_for(lambda m: m.ts == drifted.ts)
    assert published.drift == drifted.drift
