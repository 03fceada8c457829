"""Local safety: an error-rate jump after a switch and a crash loop roll the device back by itself, without a download."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from device_agent.config import SafetyConfig
from device_agent.inference import InferenceEvent
from device_agent.installer import InstallOutcome
from device_agent.safety import SafetyMonitor
from edgepack.clock import FakeClock
from tests.device_agent.agent_harness import agents, desire, install, samples, wait_until  # noqa: F401 - agents is a fixture
from edgepack.protocol import DesiredState, encode
from tests.device_agent.conftest import StatusWatcher, agent_config, publish_desired
from tests.support import REPO


def switched(new: str, previous: str | None) -> InstallOutcome:
    return InstallOutcome(phase="active", current_bundle=new, previous_bundle=previous, switched=True)


def requests(monitor: SafetyMonitor, bundle_id: str, total: int, failed: int) -> None:
    """`total` requests of which `failed`, spread evenly, fail."""
    for index in range(total):
        fails = (index + 1) * failed // total > index * failed // total
        monitor.observe(InferenceEvent(bundle_id, {}, None, 1.0, "boom" if fails else None, 0.0))


@pytest.fixture
def monitor(tmp_path):
    calls: list[tuple[str, str]] = []
    clock = FakeClock()

    def switch_back(bundle_id: str, reason: str) -> InstallOutcome:
        calls.append((bundle_id, reason))
        return switched("old", bundle_id)

    settings = SafetyConfig(min_requests=20, window_s=60, max_error_rate=0.5, error_rate_factor=2.0,
                            crash_loop_restarts=2, crash_loop_window_s=300)
    safety = SafetyMonitor(tmp_path, settings, switch_back=switch_back, clock=clock)
    safety.calls = calls
    safety.clock = clock
    return safety


# -- (a) the error rate after a switch: the decision --------------------------------------------------


def test_an_error_rate_above_the_floor_after_an_install_rolls_back_once(monitor):
    requests(monitor, "old", 100, failed=1)
    monitor.after_switch(switched("new", "old"), "install")
    requests(monitor, "new", 19, failed=19)
    assert monitor.calls == []  # not before min_requests
    requests(monitor, "new", 1, failed=1)
    wait_until(lambda: monitor.calls)
    requests(monitor, "new", 50, failed=50)

    assert len(monitor.calls) == 1 and monitor.calls[0][0] == "new"
    assert "error rate 100% (20 of the first 20 requests)" in monitor.calls[0][1] and "exceeds 50%" in monitor.calls[0][1]


def test_the_threshold_is_k_times_a_bad_previous_bundles_rate(monitor):
    requests(monitor, "old", 100, failed=30)  # the old bundle already failed 30 %: threshold 60 %
    monitor.after_switch(switched("new", "old"), "install")
    requests(monitor, "new", 100, failed=55)
    watch = monitor.watch
    assert (watch.requests, watch.errors, watch.threshold, watch.triggered) == (100, 55, pytest.approx(0.6), False)
    assert monitor.calls == []  # no rollback decided, so none started
    requests(monitor, "new", 100, failed=100)  # 155 of 200 = 77 %
    wait_until(lambda: monitor.calls)
    assert "exceeds 60%" in monitor.calls[0][1]


def test_only_the_first_window_after_an_install_is_watched(monitor):
    monitor.after_switch(switched("new", "old"), "install")
    requests(monitor, "new", 30, failed=0)
    monitor.clock.advance(61)
    requests(monitor, "new", 100, failed=100)  # later failures are the fleet's gates' business
    watch = monitor.watch
    assert watch.done and not watch.triggered and (watch.requests, watch.errors) == (30, 0)
    monitor.after_switch(switched("old", "new"), "rollback")  # the fleet rolled back: never undone locally
    requests(monitor, "old", 100, failed=100)
    assert monitor.watch is None
    # The decision to roll back is taken on the request's thread, so none was started: nothing to wait for.
    assert monitor.calls == []


# -- (b) crash loops: the counting, on simulated state records ----------------------------------------


def test_more_crash_restarts_than_allowed_within_the_window_roll_back_at_start(monitor):
    monitor.after_switch(switched("new", "old"), "install")  # the agent runs the new bundle...
    reasons = []
    for _ in range(3):  # ...and dies without stopping, three times
        monitor.clock.advance(20)
        reasons.append(monitor.check_at_start("new", "old"))

    assert reasons[:2] == [None, None]
    assert "restarted 3 times within 60 s of switching to new" in reasons[2] and "crash loop" in reasons[2]
    record = json.loads(monitor.record_path.read_text())
    assert record["running"] is True and len(record["restarts"]) == 3


def test_clean_stops_and_restarts_long_after_the_switch_do_not_count(monitor):
    monitor.after_switch(switched("new", "old"), "install")
    for _ in range(5):
        monitor.clock.advance(10)
        monitor.mark_clean_stop()  # SIGTERM: an upgrade, a reboot
        assert monitor.check_at_start("new", "old") is None
    monitor.clock.advance(400)  # past crash_loop_window_s
    for _ in range(5):
        assert monitor.check_at_start("new", "old") is None
    assert json.loads(monitor.record_path.read_text())["restarts"] == []


def test_a_switch_the_record_missed_is_dated_by_the_slot_install_time(monitor):
    # The process died between the pointer switch and the safety record: the record still names "old".
    monitor.after_switch(switched("old", None), "install")
    installed_at = monitor.clock.time() + 5
    reasons = []
    for _ in range(3):
        monitor.clock.advance(10)
        reasons.append(monitor.check_at_start("new", "old", active_installed_at=installed_at))
    assert reasons[:2] == [None, None] and "crash loop" in reasons[2]


# -- over a real broker: the agent rolls back by itself -----------------------------------------------


def test_an_error_rate_jump_after_a_switch_rolls_back_locally_without_a_download(agents, mosquitto, bundle_server, bundles):
    agent, statuses, _ = agents(safety={"min_requests": 10, "window_s": 60})
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    for request in samples(30):
        agent.infer(request)  # the old bundle's error rate: 0
    install(mosquitto.url, agent, statuses, 2, bundles.onnx_as_tensorrt)
    downloads_before = len(bundle_server.downloads())
    broken = bundles.onnx_as_tensorrt.ref.id

    def fail_the_new_bundle(bundle_id: str) -> None:  # the engine's fault seam: the new model fails in the runtime
        if bundle_id == broken:
            raise RuntimeError("simulated runtime failure")

    agent.engine.pre_infer = fail_the_new_bundle
    failures = 0
    for request in samples(10):
        try:
            agent.infer(request)
        except Exception:
            failures += 1
    rolled_back = statuses.wait_for(lambda s: s.phase == "rolled_back", timeout=15)
    wait_until(lambda: agent.engine.active_bundle_id == bundles.onnx.ref.id)

    assert failures == 10
    assert (rolled_back.seq, rolled_back.current_bundle, rolled_back.previous_bundle) == (2, bundles.onnx.ref.id, broken)
    assert "error rate 100% (10 of the first 10 requests)" in rolled_back.error
    assert len(bundle_server.downloads()) == downloads_before  # switched back from the other slot
    assert agent.infer(samples(1)[0])["logits"].shape == (1, 10)
    journal = agent.state.read_journal()
    assert (journal.last_seq, journal.phase) == (2, "rolled_back")
    desire(mosquitto.url, agent, 2, bundles.onnx_as_tensorrt)  # the retained install replayed: ignored
    assert agent.wait_idle(5) and agent.engine.active_bundle_id == bundles.onnx.ref.id


def test_a_crash_looping_agent_process_switches_back_before_serving(tmp_path, mosquitto, bundle_server, bundles):
    """Real processes: `python -m device_agent` SIGKILLed right after coming up, three times after a switch."""
    for bundle in bundles.all():
        bundle_server.add(bundle)
    bundle_server.enrollment_tokens.add("et_crash")
    config = agent_config(tmp_path, bundles, fleet_url=bundle_server.url, mqtt_url=mosquitto.url, device_id="crashy-1",
                          enrollment_token="et_crash", selftest_isolation="thread",
                          safety={"crash_loop_restarts": 2, "crash_loop_window_s": 120}).model_dump(mode="json")
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config))
    statuses = StatusWatcher(mosquitto.url, "crashy-1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def launch() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "device_agent", "--config", str(config_path)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def online_after(count: int):
        return statuses.wait_for(lambda s: s.state == "online" and statuses.statuses.index(s) >= count, timeout=30)

    process = launch()
    try:
        online_after(0)
        for seq, bundle in ((1, bundles.onnx), (2, bundles.onnx_as_tensorrt)):
            message = DesiredState(rollout_id="r-1", seq=seq, action="install", bundle=bundle.ref)
            publish_desired(mosquitto.url, "crashy-1", encode(message))
            final = statuses.wait_for(lambda s, seq=seq: s.seq == seq and s.phase in ("active", "failed"), timeout=30)
            assert final.phase == "active", final.error
        downloads = len(bundle_server.downloads())

        seen = []
        for _ in range(3):  # the new bundle "crashes" the agent each time it comes up
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            count = len(statuses.statuses)
            process = launch()
            seen.append(online_after(count))

        assert [s.phase for s in seen[:2]] == ["active", "active"]
        assert [s.current_bundle for s in seen[:2]] == [bundles.onnx_as_tensorrt.ref.id] * 2
        last = seen[2]
        assert last.phase == "rolled_back" and last.seq == 2
        assert last.current_bundle == bundles.onnx.ref.id and last.previous_bundle == bundles.onnx_as_tensorrt.ref.id
        assert "restarted 3 times" in last.error and "crash loop" in last.error
        assert len(bundle_server.downloads()) == downloads  # no download: the previous slot was still there

        # A clean stop (SIGTERM) and a restart do not count as crashes: it stays on the rolled-back bundle.
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.stderr.read().decode()[-1000:]
        count = len(statuses.statuses)
        process = launch()
        again = online_after(count)
        assert again.current_bundle == bundles.onnx.ref.id and again.phase == "rolled_back"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        statuses.close()
