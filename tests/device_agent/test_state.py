"""Crash safety: whatever moment the agent dies at, a restart finds a verified bundle active."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from device_agent.downloader import Downloader, DownloadSettings
from device_agent.fleet_api import FleetClient
from device_agent.installer import Installer
from device_agent.state import AgentState, verify_slot_dir
from edgepack.signing import load_public_key
from tests.support import REPO

# Every fault point of installing a third bundle over (active b = v2, previous a = v1), in order.
POINTS_BEFORE_SWITCH = [
    "install.downloaded", "install.verified",
    "pointer.drop_previous.temp_written", "clear.pointer_dropped_previous", "clear.record_removed",
    "clear.files_removed", "install.cleared", "install.extracted", "install.selftested",
    "slot_record.a.temp_written", "install.recorded", "pointer.switch.temp_written",
]
POINTS_AFTER_SWITCH = ["switch.pointer_written", "install.switched"]


def _state(path, bundles) -> AgentState:
    return AgentState(path, [load_public_key(bundles.public_key)])


def _installer(state: AgentState, server) -> Installer:
    server.credentials["dev-1"] = "dc_test"
    downloader = Downloader(state.downloads_dir, FleetClient(server.url, "dev-1", credential="dc_test"),
                            DownloadSettings(backoff_s=0.01, retries=2, timeout_s=5))
    # In-process self-tests keep this file fast; the killed children below use the default (a child process).
    return Installer(state, downloader, profile="rpi4", selftest_timeout_s=30, selftest_isolation="thread")


def _child(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.device_agent.install_child", json.dumps(spec)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})


def _assert_verified_active(state: AgentState, allowed: set[str]) -> str | None:
    report = state.recover()
    pointer = state.read_pointer()
    if pointer.active is None:
        assert None in allowed, f"no active bundle after recovery: {report.actions}"
        return None
    assert pointer.active.bundle_id in allowed, report.actions
    record, _ = state.verify_slot(pointer.active.slot, pointer.active.bundle_id)
    assert record.selftest.get("passed") is True
    if pointer.previous is not None:
        state.verify_slot(pointer.previous.slot, pointer.previous.bundle_id)
    return pointer.active.bundle_id


@pytest.fixture
def two_installed(tmp_path, bundle_server, bundles):
    """A state folder with v1 in slot a (previous) and v2 in slot b (active)."""
    for bundle in bundles.all():
        bundle_server.add(bundle)
    state = _state(tmp_path / "base", bundles)
    state.recover()
    installer = _installer(state, bundle_server)
    assert installer.install(bundles.v1.ref).phase == "active"
    assert installer.install(bundles.v2.ref).phase == "active"
    return state.root


def test_a_kill_at_any_step_of_an_install_leaves_a_verified_bundle_active(tmp_path, bundle_server, bundles, two_installed):
    new = bundles.onnx.ref
    children = {}
    for point in POINTS_BEFORE_SWITCH + POINTS_AFTER_SWITCH:
        state_dir = tmp_path / f"crash-{point}"
        shutil.copytree(two_installed, state_dir)
        children[point] = (state_dir, _child({
            "state_dir": str(state_dir), "public_key": str(bundles.public_key), "fleet_url": bundle_server.url,
            "credential": "dc_test", "refs": [new.model_dump(mode="json")], "kill_at": point}))

    for point, (state_dir, process) in children.items():
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == -9, f"{point}: the child was not killed there (rc {process.returncode}): {stderr.decode()[-500:]}"
        state = _state(state_dir, bundles)
        expected = bundles.v2.ref.id if point in POINTS_BEFORE_SWITCH else new.id
        assert _assert_verified_active(state, {expected}) == expected, point
        # and the device still converges: the interrupted install completes on the next try
        outcome = _installer(state, bundle_server).install(new)
        assert (outcome.phase, outcome.current_bundle) == ("active", new.id), (point, outcome.error)


def test_kills_at_random_moments_during_installs_never_leave_a_half_installed_bundle(tmp_path, bundle_server, bundles):
    for bundle in bundles.all():
        bundle_server.add(bundle)
    bundle_server.credentials["dev-1"] = "dc_test"
    refs = [bundles.v1.ref, bundles.v2.ref, bundles.onnx.ref]
    state_dir = tmp_path / "state"
    rng = random.Random(20240605)
    seen: set[str | None] = set()
    for _ in range(50):  # issue 5: SIGKILL at random moments during 50 installs
        process = _child({"state_dir": str(state_dir), "public_key": str(bundles.public_key), "fleet_url": bundle_server.url,
                          "credential": "dc_test", "refs": [r.model_dump(mode="json") for r in refs], "loop": True})
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.9))  # an install takes a few tenths of a second: kills land in all its steps
        process.kill()
        process.communicate(timeout=10)
        seen.add(_assert_verified_active(_state(state_dir, bundles), {None, *(r.id for r in refs)}))
    assert seen - {None}, "no install ever completed: the kill delays are too short for this machine"


def test_leftovers_of_a_crash_are_cleaned_up_and_do_not_block_the_next_install(tmp_path, bundle_server, bundles):
    for bundle in bundles.all():
        bundle_server.add(bundle)
    state = _state(tmp_path / "state", bundles)
    state.recover()
    installer = _installer(state, bundle_server)
    installer.install(bundles.v1.ref)
    (state.slots_dir / "b" / "model").mkdir(parents=True)
    (state.slots_dir / "b" / "model" / "model.tflite").write_bytes(b"half a model")
    (state.slots_dir / ".b.x1y2.partial" / "model").mkdir(parents=True)
    (state.root / ".current.abc.tmp").write_text("{")
    state.part_path("f" * 64).write_bytes(b"stale")

    report = state.recover()

    assert report.active.bundle_id == bundles.v1.ref.id
    assert not (state.slots_dir / ".b.x1y2.partial").exists() and not (state.root / ".current.abc.tmp").exists()
    assert installer.install(bundles.v2.ref).phase == "active"
    verify_slot_dir(state.slot_dir("b"), state.trusted_keys)
    assert list(state.downloads_dir.iterdir()) == []


def test_a_damaged_active_slot_falls_back_to_the_previous_one(tmp_path, bundle_server, bundles, two_installed):
    state = _state(two_installed, bundles)
    model = state.slot_dir("b") / bundles.v2.manifest.model
    model.write_bytes(b"\0" + model.read_bytes()[1:])

    report = state.recover()

    assert report.active.bundle_id == bundles.v1.ref.id and report.previous is None
    assert any("fell back to slot a" in action for action in report.actions)
    assert state.active_bundle().slot == "a"

    (state.slot_dir("a") / "manifest.sig").write_text("{}")
    report = state.recover()
    assert report.active is None and state.active_bundle() is None


def test_the_credential_file_is_private(tmp_path, bundles):
    state = _state(tmp_path / "state", bundles)
    state.ensure_layout()

    state.write_credential("dc_secret")

    assert state.read_credential() == "dc_secret"
    assert oct(state.credential_path.stat().st_mode & 0o777) == "0o600"
