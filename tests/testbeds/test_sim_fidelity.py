"""The simulated fleet's host budget and fidelity check, as pure computations (no broker, fleet or agent)."""

from __future__ import annotations

import json
import random
import threading

import pytest

from testbeds.sim import (
    DEVICE_LATENCY_MS, HOST_BUDGET_HZ, REAL_PART_TOLERANCE, Scenario, SimulatedFleet, WorkloadStats, fidelity,
    load_scenario, per_device_rate,
)


def _stats(real_ms: dict[str, list[float]], *, planned_hz: float = 100.0, elapsed_s: float = 10.0,
           completed: int | None = None, offline: int = 0) -> WorkloadStats:
    answered = sum(len(values) for values in real_ms.values())
    return WorkloadStats(planned_hz=planned_hz, elapsed_s=elapsed_s, completed=answered if completed is None else completed,
                         offline=offline, real_ms={profile: list(values) for profile, values in real_ms.items()})


@pytest.mark.parametrize(("rate_hz", "budget", "devices", "expected"), [
    (20.0, 600.0, 20, 20.0),  # within the budget: the scenario's rate
    (20.0, 600.0, 60, 10.0),
    (20.0, 600.0, 500, 1.2),
    (2.0, HOST_BUDGET_HZ, 500, HOST_BUDGET_HZ / 500),  # healthy-large at its size
    (0.2, 600.0, 500, 0.2),
    (0.0, 600.0, 60, 0.0),
])
def test_the_per_device_rate_keeps_the_whole_workload_within_the_host_budget(rate_hz, budget, devices, expected):
    rate = per_device_rate(rate_hz, budget, devices)

    assert rate == pytest.approx(expected)
    assert rate * devices <= max(budget, rate_hz * devices) and rate * devices <= budget + 1e-9


def test_a_run_within_the_tolerance_is_faithful():
    parent = _stats({"rpi5": [0.4] * 95 + [5.0] * 5, "x86-avx2": [0.3] * 100}, planned_hz=100.0, completed=950)

    report = fidelity([parent], {"rpi5": 60.0, "x86-avx2": 40.0})

    assert report["ok"] and report["reason"] is None
    rpi5 = report["profiles"]["rpi5"]
    assert rpi5["claimed_ms"] == 60.0 and rpi5["requests"] == 100 and rpi5["ok"]
    assert rpi5["real_part_p50_ms"] == pytest.approx(0.4) and rpi5["real_part_p95_ms"] <= 5.0
    assert rpi5["distortion"] == pytest.approx(rpi5["real_part_p95_ms"] / 60.0, abs=1e-4)
    assert report["rate"] == {"planned_hz": 100.0, "achieved_hz": 95.0, "ok": True}
    assert report["tolerance"] == {"real_part_p95_of_claimed": REAL_PART_TOLERANCE, "achieved_rate_of_planned": 0.8}
    json.dumps(report)  # it goes into the --json document as it is


def test_a_profile_with_few_requests_is_judged_on_its_median_not_on_one_slow_request():
    # the low-traffic scenario's 26 requests: three met an install (4.2 ms), the rest 0.4 ms: the p95 of 26 is theirs
    few = _stats({"rpi5": [0.4] * 100, "x86-avx2": [0.4] * 23 + [4.2] * 3}, planned_hz=10.0, completed=126)
    report = fidelity([few], {"rpi5": 60.0, "x86-avx2": 40.0})
    x86 = report["profiles"]["x86-avx2"]
    assert report["ok"] and x86["judged_on"] == "p50" and x86["real_part_p95_ms"] > 0.1 * 40.0
    assert report["profiles"]["rpi5"]["judged_on"] == "p95"

    # a busy host slows most of them: the median says so
    busy = _stats({"rpi5": [0.4] * 100, "x86-avx2": [5.0] * 26}, planned_hz=10.0, completed=126)
    report = fidelity([busy], {"rpi5": 60.0, "x86-avx2": 40.0})
    assert not report["ok"] and "x86-avx2's real inference time p50 5.0 ms is 12 %" in report["reason"]


def test_a_slow_real_part_on_one_profile_makes_the_host_saturated_and_says_so_in_one_line():
    # rpi5 fine, x86-avx2's real part p95 8 ms: 20 % of its 40 ms
    answers = {"rpi5": [1.0] * 100, "x86-avx2": [1.0] * 90 + [8.0] * 10}
    report = fidelity([_stats(answers, planned_hz=20.0)], {"rpi5": 60.0, "x86-avx2": 40.0})

    assert not report["ok"]
    assert report["profiles"]["rpi5"]["ok"] and not report["profiles"]["x86-avx2"]["ok"]
    assert report["profiles"]["x86-avx2"]["distortion"] == pytest.approx(0.2, abs=0.01)
    assert report["reason"] == ("host saturated: x86-avx2's real inference time p95 8.0 ms is 20 % of its simulated 40 ms "
                                "(tolerance 10 %); this run's verdict is not a judgement of the release")
    assert "\n" not in report["reason"]


def test_a_workload_that_fell_behind_its_plan_is_saturated_even_with_fast_answers():
    # planned 100 req/s for 10 s; a parent and a worker (its summary read back from JSON) did 700 in all
    parent = _stats({"rpi5": [0.5] * 400}, planned_hz=50.0)
    worker = WorkloadStats.from_json(json.loads(json.dumps(_stats({"x86-avx2": [0.5] * 300}, planned_hz=50.0).to_json())))

    report = fidelity([parent, worker], {"rpi5": 60.0, "x86-avx2": 40.0})

    assert all(row["ok"] for row in report["profiles"].values())
    assert report["rate"] == {"planned_hz": 100.0, "achieved_hz": 70.0, "ok": False}
    assert not report["ok"] and "the workload achieved 70 of 100 planned requests/s (70 %, tolerance 80 %)" in report["reason"]


def test_offline_devices_turns_are_not_planned_and_a_missing_worker_summary_is_not_vouched_for():
    # 20 devices at 5 req/s for 10 s, a fifth of them offline the whole time: 800 planned, 800 done
    offline = _stats({"rpi5": [0.5] * 800}, planned_hz=100.0, offline=200)
    assert fidelity([offline], {"rpi5": 60.0})["rate"] == {"planned_hz": 80.0, "achieved_hz": 80.0, "ok": True}

    missing = fidelity([offline], {"rpi5": 60.0}, missing=1)
    assert not missing["ok"] and missing["missing_summaries"] == 1
    assert "1 worker process(es) left no workload summary" in missing["reason"]


def test_no_workload_distorts_nothing():
    report = fidelity([_stats({}, planned_hz=0.0, elapsed_s=30.0)], {"rpi5": 60.0})

    assert report["ok"] and report["profiles"]["rpi5"]["requests"] == 0 and report["profiles"]["rpi5"]["distortion"] is None
    assert report["rate"] == {"planned_hz": 0.0, "achieved_hz": 0.0, "ok": True}


def test_workload_stats_count_from_many_threads_and_round_trip_through_json():
    stats = WorkloadStats(planned_hz=10.0)

    def work() -> None:
        for index in range(1000):
            stats.record("rpi5", None if index % 10 == 0 else 0.25)
        stats.skip_offline()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert (stats.completed, stats.failed, stats.offline, len(stats.real_ms["rpi5"])) == (4000, 400, 4, 3600)
    again = WorkloadStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert again.to_json() == stats.to_json()


class _Engine:
    simulated_latency_ms = None


class _Agent:
    def __init__(self, device_id: str, profile: str) -> None:
        self.device_id, self.profile = device_id, profile
        self.agent = type("Running", (), {"engine": _Engine()})()


def test_the_device_clock_is_base_times_fault_times_a_reproducible_lognormal_jitter(tmp_path):
    scenario = Scenario.model_validate({
        "name": "t", "devices": {"profiles": ["rpi5", "x86-avx2"]}, "workload": {"latency_jitter": 0.1},
        "faults": [{"kind": "latency", "profile": "rpi5", "bundle": "candidate", "factor": 1.5}]})
    fleet = SimulatedFleet(scenario, 2, tmp_path)
    fleet.baseline_ids, fleet.candidate_ids = ["old"], ["new"]
    rpi5, x86 = _Agent("dev-000", "rpi5"), _Agent("dev-001", "x86-avx2")
    fleet._hook(rpi5)
    fleet._hook(x86)
    clock = rpi5.agent.engine.simulated_latency_ms

    old = [clock("old") for _ in range(2000)]
    new = [clock("new") for _ in range(2000)]
    other = [x86.agent.engine.simulated_latency_ms("new") for _ in range(2000)]

    expected = random.Random("dev-000")
    assert old[:3] == [DEVICE_LATENCY_MS["rpi5"] * expected.lognormvariate(0.0, 0.1) for _ in range(3)]  # seeded by the id
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    assert median(old) == pytest.approx(60.0, rel=0.02) and median(new) == pytest.approx(90.0, rel=0.02)
    assert median(other) == pytest.approx(40.0, rel=0.02)  # the fault is rpi5's only
    assert 0.08 < _log_spread(old) < 0.12
    assert fleet._simulated.ms == other[-1]  # what the workload subtracts to get the real part


def _log_spread(values: list[float]) -> float:
    import math
    import statistics

    return statistics.pstdev(math.log(v) for v in values)


def test_scenarios_state_the_host_budget_and_the_new_rollout_fields():
    assert load_scenario("healthy").workload.max_total_rate_hz == HOST_BUDGET_HZ
    assert load_scenario("low-traffic").expect.status == "paused"
    assert load_scenario("low-traffic").rollout.max_bake_s is not None
    minor = load_scenario("latency-minor")
    assert minor.expect.status == "succeeded" and minor.faults[0].factor == pytest.approx(1.1)
    large = load_scenario("healthy-large")
    assert set(load_scenario("healthy").rollout.gates) - {"install_failure_ratio<=0.1"} <= set(large.rollout.gates)
