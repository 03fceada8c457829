"""Gate specs and their evaluation per hardware profile, on a real SQLite database."""

from __future__ import annotations

import math

import pytest

from edgepack.errors import ConfigError
from edgepack.protocol import DeviceStatus
from fleet.controller import RolloutController
from fleet.models import Rollout
from fleet.services.gates import DEFAULT_GATES, METRIC_SOURCES, GateSpec, evaluate_gates, parse_gates
from fleet.services.rollouts import create_rollout
from fleet.services.status import apply_status
from tests.fleet.rollout_helpers import (
    FakeClock, RecordingPublisher, SimulatedDevices, add_bundle, add_device, session_factory_at,
)
from tests.fleet.telemetry_helpers import latency_samples, report, window

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text, expected", [
    ("install_failure_ratio<=0.1", GateSpec("install_failure_ratio", "<=", 0.1)),
    ("install_timeout_ratio<=0", GateSpec("install_timeout_ratio", "<=", 0.0)),
    ("active_ratio>=1.0", GateSpec("active_ratio", ">=", 1.0)),
    (" p95_latency_ms <= 1.10x control ", GateSpec("p95_latency_ms", "<=", 1.1, "control")),
    ("p99_latency_ms<=50", GateSpec("p99_latency_ms", "<=", 50.0)),
    ("error_rate<=0.01", GateSpec("error_rate", "<=", 0.01)),
    ("drift<=0.2", GateSpec("drift", "<=", 0.2)),
    ("min_inferences>=500", GateSpec("min_inferences", ">=", 500.0)),
    ("error_rate<2 x control", GateSpec("error_rate", "<", 2.0, "control")),
])
def test_parse_gate_specs(text, expected):
    spec = GateSpec.parse(text)

    assert spec == expected
    assert GateSpec.parse(spec.text) == spec
    assert GateSpec.from_value(spec.to_dict()) == spec


@pytest.mark.parametrize("text, fragment", [
    ("install_failure_rate<=0.1", "unknown metric 'install_failure_rate'"),
    ("install_failure_ratio=0.1", "expected METRIC OP NUMBER"),
    ("install_failure_ratio<=ten", "expected METRIC OP NUMBER"),
    ("install_failure_ratio<=1.5x control", "cannot be relative"),
    ("p95_latency_ms<=1.1x baseline", "only be relative to 'control'"),
    ("install_failure_ratio<=1.5", "lies in [0, 1]"),
    ("min_inferences<=500", "takes >= or >"),
    ("p95_latency_ms<=0x control", "positive factor"),
    ("", "expected METRIC OP NUMBER"),
])
def test_parse_errors_name_the_spec(text, fragment):
    with pytest.raises(ConfigError) as caught:
        GateSpec.parse(text)

    assert f"gate {text!r}" in str(caught.value)
    assert fragment in str(caught.value)


def test_duplicate_gates_are_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_gates(["active_ratio>=1", "active_ratio>=1.0"])


def test_registry_holds_install_and_telemetry_metrics():
    kinds = {name: source.kind for name, source in METRIC_SOURCES.items()}

    assert {n for n, k in kinds.items() if k == "install"} == {"install_failure_ratio", "install_timeout_ratio", "active_ratio"}
    assert {"p95_latency_ms", "p99_latency_ms", "error_rate", "drift", "min_inferences"} <= {
        n for n, k in kinds.items() if k == "telemetry"}
    assert all(GateSpec.parse(text) for text in DEFAULT_GATES)


# ------------------------------------------------------------------ evaluation


@pytest.fixture
def fleet_db(tmp_path):
    """Release v2 built for rpi5 and x86-avx2; 10 x86 devices and 2 rpi5 devices on v1."""
    session_factory = session_factory_at(tmp_path)
    with session_factory() as session:
        v1 = {p: add_bundle(session, "digits", "1.0.0", p).id for p in ("rpi5", "x86-avx2")}
        v2 = {p: add_bundle(session, "digits", "2.0.0", p).id for p in ("rpi5", "x86-avx2")}
        for i in range(10):
            add_device(session, f"x86-{i:02d}", "x86-avx2", {"site": "lab"}, current_bundle=v1["x86-avx2"])
        for i in range(2):
            add_device(session, f"rpi-{i:02d}", "rpi5", {"site": "lab"}, current_bundle=v1["rpi5"])
    return session_factory, v1, v2


def _start(session_factory, v2, gates, waves=(100,), bake_s=0.0, clock=None):
    clock = clock or FakeClock()
    publisher = RecordingPublisher()
    with session_factory() as session:
        rollout_id = create_rollout(session, "alice", v2["x86-avx2"], {"site": "lab"}, waves=list(waves), gates=gates,
                                    bake_s=bake_s, min_reports=1, install_timeout_s=600)["id"]
    controller = RolloutController(session_factory, publisher, clock=clock)
    controller.tick()  # starts wave 0 and publishes it
    return rollout_id, controller, publisher, clock


def _verdict(session_factory, rollout_id, clock):
    with session_factory() as session:
        rollout = session.get(Rollout, rollout_id)
        return evaluate_gates(session, rollout, rollout.current_wave, clock())


def test_one_failing_profile_is_not_hidden_by_the_fleet_average(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["install_failure_ratio<=0.1"])
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.fail = {"rpi-00"}  # 1 of 12 devices overall (0.083 ≤ 0.1), but 1 of 2 rpi5 devices

    devices.answer()
    verdict = _verdict(session_factory, rollout_id, clock)

    assert verdict.decision == "rollback"
    gate = verdict.evidence["gates"][0]
    assert gate["metric"] == "install_failure_ratio" and gate["cohort"] == "treatment"
    assert gate["threshold"] == 0.1 and gate["passed"] is False
    assert gate["values"] == {"rpi5": 0.5, "x86-avx2": 0.0}
    assert gate["profiles"]["rpi5"]["outcome"] == "fail"
    assert gate["profiles"]["x86-avx2"]["outcome"] == "pass"
    assert "rpi5" in verdict.reason and "x86-avx2" not in verdict.reason


def test_pending_installs_hold_until_the_outcome_is_certain(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["install_failure_ratio<=0.1", "active_ratio>=1.0"])

    verdict = _verdict(session_factory, rollout_id, clock)

    assert verdict.decision == "hold"
    assert verdict.reason == "waiting for installs; waiting for reports"
    bounds = verdict.evidence["gates"][1]["profiles"]["x86-avx2"]["bounds"]
    assert bounds == [0.0, 1.0]


def test_all_active_promotes_with_evidence_per_profile(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, list(DEFAULT_GATES), bake_s=30)
    SimulatedDevices(session_factory, publisher, clock).answer()

    baking = _verdict(session_factory, rollout_id, clock)
    clock.advance(30)
    baked = _verdict(session_factory, rollout_id, clock)

    assert baking.decision == "hold" and baking.reason == "baking"
    assert baked.decision == "promote"
    assert baked.evidence["bake"] == {"required_s": 30.0, "max_s": 300.0, "elapsed_s": 30.0, "done": True}
    active = next(g for g in baked.evidence["gates"] if g["metric"] == "active_ratio")
    assert active["values"] == {"rpi5": 1.0, "x86-avx2": 1.0} and active["passed"] is True


def test_a_device_reporting_active_on_another_bundle_is_not_active(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["active_ratio>=1.0"])
    SimulatedDevices(session_factory, publisher, clock).answer()
    seq = publisher.latest()["rpi-01"].seq
    with session_factory() as session:  # the device says "active" but still runs v1
        apply_status(session, DeviceStatus(device_id="rpi-01", seq=seq, rollout_id=rollout_id, phase="active",
                                           current_bundle=v1["rpi5"]), now=clock())

    verdict = _verdict(session_factory, rollout_id, clock)

    assert verdict.decision == "rollback"
    assert verdict.evidence["gates"][0]["values"] == {"rpi5": 0.5, "x86-avx2": 1.0}


def test_telemetry_gates_hold_without_telemetry(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["active_ratio>=1", "p95_latency_ms<=1.10x control",
                                                                   "error_rate<=0.01", "drift<=0.2"])
    SimulatedDevices(session_factory, publisher, clock).answer()

    verdict = _verdict(session_factory, rollout_id, clock)
    clock.advance(11)  # the first look (bake 0: 10 s in, one sixth of the 60 s maximum bake)
    looked = _verdict(session_factory, rollout_id, clock)

    assert verdict.decision == "hold"
    assert verdict.reason == "baking until the first look at 10 s; no telemetry yet"
    assert looked.decision == "hold" and looked.reason == "no telemetry yet"
    for gate in looked.evidence["gates"][1:]:
        assert gate["passed"] is False
        assert {entry["reason"] for entry in gate["profiles"].values()} == {"no telemetry yet"}
        assert {entry["outcome"] for entry in gate["profiles"].values()} == {"inconclusive"}


def _half_rollout(fleet_db, gates):
    """A rollout in waves 50/100 whose first wave installed: half of each profile is treatment; the rest,
    and the hold-back, stay on v1 as the control. (rollout id, devices, treated device ids, clock)"""
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, gates, waves=(50, 100))
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.answer()
    return rollout_id, devices, set(publisher.latest()), clock


def _windows_at(session_factory, clock, devices_bundles, median_ms, seed, n=200):
    """One telemetry window per (device, bundle) with a real latency histogram, received now."""
    for device_id, bundle in devices_bundles:
        report(session_factory, window(device_id, bundle, latency_samples(f"{device_id}-{seed}", median_ms(device_id, bundle), n)),
               clock())


def test_latency_regression_on_one_profile_rolls_back_against_its_control(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, devices, treated, clock = _half_rollout(fleet_db, ["p95_latency_ms<=1.10x control", "min_inferences>=200"])
    profile = {d: "rpi5" if d.startswith("rpi") else "x86-avx2" for d in [f"x86-{i:02d}" for i in range(10)] + ["rpi-00", "rpi-01"]}
    on = [(d, v2[p] if d in treated else v1[p]) for d, p in profile.items()]

    def median(device_id, bundle):
        base = 20.0 if device_id.startswith("rpi") else 4.0
        return base * (1.5 if device_id.startswith("rpi") and bundle == v2["rpi5"] else 1.0)

    for step in range(2):  # the first window after the switch is not judged; the second is
        clock.advance(5)
        _windows_at(session_factory, clock, on, median, step)
    before = _verdict(session_factory, rollout_id, clock)
    clock.advance(1.5)  # past the first look at 10 s (bake 0, maximum bake 60 s, six looks)
    verdict = _verdict(session_factory, rollout_id, clock)

    assert before.decision == "hold" and before.reason.startswith("baking until the first look")
    assert verdict.decision == "rollback"
    gate = verdict.evidence["gates"][0]
    assert gate["cohort"] == "treatment vs control"
    rpi, x86 = gate["profiles"]["rpi5"], gate["profiles"]["x86-avx2"]
    p95 = math.exp(1.645 * 0.1)  # the samples are lognormal around the median, sigma 0.1
    assert rpi["outcome"] == "fail" and rpi["value"] == pytest.approx(30.0 * p95, rel=0.1)
    assert rpi["control"] == pytest.approx(20.0 * p95, rel=0.1)
    assert rpi["threshold"] == "1.10x control" and rpi["test"]["limit"] == 1.1 and rpi["test"]["low"] > 1.1
    assert rpi["control_cohort"] == "control" and rpi["method"] == "merged latency histogram"
    assert (rpi["devices"], rpi["control_devices"], rpi["windows"], rpi["control_windows"]) == (1, 1, 1, 1)
    assert rpi["excluded_windows"] == 1
    assert x86["outcome"] == "pass" and x86["test"]["high"] < 1.1
    assert verdict.reason.startswith("p95_latency_ms<=1.1x control failed on rpi5: treatment ")
    assert "beyond 1.1" in verdict.reason and "x86-avx2" not in verdict.reason


def test_a_relative_latency_gate_without_histograms_is_inconclusive(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, devices, treated, clock = _half_rollout(fleet_db, ["p95_latency_ms<=1.10x control", "min_inferences>=200"])
    for _ in range(2):
        clock.advance(5)
        for device_id in [f"x86-{i:02d}" for i in range(10)]:
            devices.report_telemetry(device_id, v2["x86-avx2"] if device_id in treated else v1["x86-avx2"], p95_ms=4.0)
    clock.advance(1.5)

    verdict = _verdict(session_factory, rollout_id, clock)

    x86 = verdict.evidence["gates"][0]["profiles"]["x86-avx2"]
    assert verdict.decision == "hold" and x86["outcome"] == "inconclusive"
    assert "a relative latency gate compares histograms" in x86["reason"]


def test_min_inferences_holds_instead_of_failing(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["error_rate<=0.01", "min_inferences>=1000"])
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.answer()
    for _ in range(2):  # the first window after a switch is not judged
        clock.advance(10)
        for device_id, desired in publisher.latest().items():
            devices.report_telemetry(device_id, desired.bundle.id, p95_ms=5, inferences=100)

    verdict = _verdict(session_factory, rollout_id, clock)

    assert verdict.decision == "hold"
    assert verdict.reason == "min_inferences not reached; not enough inferences"
    assert verdict.evidence["gates"][1]["values"] == {"rpi5": 200.0, "x86-avx2": 1000.0}


def test_error_rate_and_drift_measured_per_profile(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["error_rate<=0.01", "drift<=0.2"])
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.answer()
    for first in (True, False):  # the first window after a switch is not judged: make it look terrible
        clock.advance(10)
        for device_id, desired in publisher.latest().items():
            bad = device_id.startswith("x86-0") and device_id.endswith(("0", "1"))
            devices.report_telemetry(device_id, desired.bundle.id, p95_ms=5, inferences=1000,
                                     errors=1000 if first else 50 if bad else 0,
                                     drift={"input": 0.05, "output": 0.3 if device_id == "rpi-00" else 0.1})

    verdict = _verdict(session_factory, rollout_id, clock)

    errors, drift = verdict.evidence["gates"]
    assert errors["values"] == {"rpi5": 0.0, "x86-avx2": 0.01} and errors["passed"] is True
    assert drift["values"] == {"rpi5": 0.2, "x86-avx2": 0.1} and drift["passed"] is True
    assert drift["profiles"]["rpi5"]["worst"] == "output"
    assert verdict.decision == "promote"


@pytest.mark.parametrize("agreement, outcome", [(0.99, "pass"), (0.80, "fail")])
def test_shadow_agreement_is_judged_with_its_interval(fleet_db, agreement, outcome):
    from edgepack.protocol import Telemetry
    from fleet.services.status import record_telemetry

    session_factory, v1, v2 = fleet_db
    rollout_id, _, publisher, clock = _start(session_factory, v2, ["shadow_agreement>=0.95", "min_inferences>=200"])
    SimulatedDevices(session_factory, publisher, clock).answer()
    for _ in range(2):  # min_inferences does not count the first window after a switch
        clock.advance(5)
        with session_factory() as session:
            for device_id, desired in publisher.latest().items():
                record_telemetry(session, Telemetry(device_id=device_id, window_id=f"{device_id}-{clock()}",
                                                    bundle_id=desired.bundle.id, window_s=5,
                                                    inferences=300, errors=0, shadow={"samples": 300, "agreement": agreement}),
                                 now=clock())
    clock.advance(1.5)

    verdict = _verdict(session_factory, rollout_id, clock)

    gate = verdict.evidence["gates"][0]
    rpi = gate["profiles"]["rpi5"]  # 2 devices × 2 windows × 300 compared requests
    assert rpi["outcome"] == outcome and rpi["shadow_samples"] == 1200
    assert rpi["test"]["limit"] == 0.95 and rpi["test"]["low"] < agreement < rpi["test"]["high"]
    assert verdict.decision == ("rollback" if outcome == "fail" else "promote"), verdict.reason


def test_a_relative_error_rate_compares_both_cohorts_over_the_same_span(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id, devices, treated, clock = _half_rollout(fleet_db, ["error_rate<=1.5x control", "min_inferences>=500"])
    for _ in range(2):
        clock.advance(5)
        for i in range(10):
            device_id = f"x86-{i:02d}"
            new = device_id in treated
            devices.report_telemetry(device_id, v2["x86-avx2"] if new else v1["x86-avx2"], p95_ms=4.0, inferences=1000,
                                     errors=60 if new else 10)
    clock.advance(1.5)

    verdict = _verdict(session_factory, rollout_id, clock)

    x86 = verdict.evidence["gates"][0]["profiles"]["x86-avx2"]
    assert x86["outcome"] == "fail" and x86["value"] == pytest.approx(0.06) and x86["control"] == pytest.approx(0.01)
    # p_t − 1.5·p_c = 0.06 − 0.015, its interval above the 0.001 allowance
    assert x86["test"]["estimate"] == pytest.approx(0.045) and x86["test"]["low"] > 0.001
    assert verdict.decision == "rollback"
