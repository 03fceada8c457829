"""A/B install and rollback on real bundles: what gets active, what gets refused and why."""

from __future__ import annotations

import hashlib

import pytest

from device_agent.downloader import Downloader, DownloadSettings
from device_agent.fleet_api import FleetClient
from device_agent.installer import Installer
from device_agent.state import AgentState, verify_slot_dir
from edgepack.protocol import BundleRef
from edgepack.signing import load_public_key
from tests.edgepack.samples import resign_with_manifest


def _installer(tmp_path, server, bundles, *, profile="rpi4", **options) -> Installer:
    server.credentials["dev-1"] = "dc_test"
    state = AgentState(tmp_path / "state", [load_public_key(bundles.public_key)])
    state.recover()
    downloader = Downloader(state.downloads_dir, FleetClient(server.url, "dev-1", credential="dc_test"),
                            DownloadSettings(backoff_s=0.01, retries=2, timeout_s=5))
    return Installer(state, downloader, profile=profile, selftest_timeout_s=options.pop("selftest_timeout_s", 30), **options)


def _serve_all(server, bundles) -> None:
    for bundle in bundles.all():
        server.add(bundle)


def test_install_goes_through_every_phase_and_keeps_the_old_slot_for_rollback(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles)
    phases: list[str] = []

    first = installer.install(bundles.v1.ref, phases.append)
    second = installer.install(bundles.v2.ref, phases.append)

    assert phases == ["downloading", "verifying", "installing", "selftest"] * 2
    assert (first.phase, first.current_bundle, first.previous_bundle) == ("active", bundles.v1.ref.id, None)
    assert (second.phase, second.current_bundle, second.previous_bundle) == ("active", bundles.v2.ref.id, bundles.v1.ref.id)
    assert second.selftest.passed and second.selftest.cases == 4
    active = installer.state.active_bundle()
    assert (active.slot, active.version) == ("b", "2.0.0")
    verify_slot_dir(installer.state.slot_dir("a"), installer.state.trusted_keys)  # v1 still intact
    assert list(installer.state.downloads_dir.iterdir()) == []


def test_installing_the_active_bundle_again_does_nothing(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles)
    installer.install(bundles.v1.ref)
    phases: list[str] = []

    outcome = installer.install(bundles.v1.ref, phases.append)

    assert (outcome.phase, outcome.switched, phases) == ("active", False, [])
    assert len(bundle_server.downloads()) == 1


@pytest.mark.parametrize(("bad", "reason"), [
    ("tampered", ": sha256 mismatch (bundle tampered?)"),
    ("untrusted", "bundle refused: signed by unknown key"),
    ("wrong_profile", "built for profile 'rpi5'"),
    ("selftest_fails", "self-test failed: self-test case 0 output logits: |error|"),
    ("other_runtime", "runtime rknn not available on this device"),
])
def test_a_bad_bundle_is_refused_with_the_reason_and_the_active_one_stays(tmp_path, bundle_server, bundles, bad, reason):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles)
    installer.install(bundles.v1.ref)

    outcome = installer.install(getattr(bundles, bad).ref)

    assert outcome.phase == "failed" and reason in outcome.error
    assert not outcome.retryable
    assert outcome.current_bundle == bundles.v1.ref.id
    active = installer.state.active_bundle()
    assert (active.bundle_id, active.slot) == (bundles.v1.ref.id, "a")
    verify_slot_dir(active.path, installer.state.trusted_keys)
    assert installer.state.read_slot_record("b") is None  # nothing half-installed is left to trust
    assert list(installer.state.downloads_dir.iterdir()) == []


@pytest.mark.parametrize("which", ["onnx", "onnx_as_tensorrt"])
def test_onnxruntime_runs_the_selftest_of_onnxruntime_and_tensorrt_bundles(tmp_path, bundle_server, bundles, which):
    bundle = getattr(bundles, which)
    bundle_server.add(bundle)
    installer = _installer(tmp_path, bundle_server, bundles)

    outcome = installer.install(bundle.ref)

    assert outcome.phase == "active", outcome.error
    assert outcome.selftest.runtime == bundle.manifest.runtime and outcome.selftest.cases == 3


def test_a_profile_alias_is_accepted(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles, profile="raspberry-pi-4")

    assert installer.install(bundles.v1.ref).phase == "active"


def test_a_selftest_that_runs_past_its_timeout_fails(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles, selftest_timeout_s=0.01)

    outcome = installer.install(bundles.v1.ref)

    assert outcome.phase == "failed" and "self-test did not finish within 0.01 s" in outcome.error
    assert installer.state.active_bundle() is None


def test_rollback_switches_slots_without_a_download(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles)
    installer.install(bundles.v1.ref)
    installer.install(bundles.v2.ref)
    downloads_before = len(bundle_server.downloads())
    phases: list[str] = []

    back = installer.rollback(bundles.v1.ref, phases.append)

    assert (back.phase, back.current_bundle, back.previous_bundle) == ("rolled_back", bundles.v1.ref.id, bundles.v2.ref.id)
    assert phases == ["verifying"]
    assert len(bundle_server.downloads()) == downloads_before
    # and forward again to v2, still without a download: it is in the other slot, verified
    forward = installer.install(bundles.v2.ref, phases.append)
    assert (forward.phase, forward.current_bundle) == ("active", bundles.v2.ref.id)
    assert len(bundle_server.downloads()) == downloads_before


def test_rollback_refuses_a_slot_that_no_longer_verifies(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles)
    installer.install(bundles.v1.ref)
    installer.install(bundles.v2.ref)
    model = installer.state.slot_dir("a") / bundles.v1.manifest.model
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")

    outcome = installer.rollback(None)

    assert outcome.phase == "failed" and "does not match the signed manifest" in outcome.error
    assert installer.state.active_bundle().bundle_id == bundles.v2.ref.id


def test_rollback_to_a_bundle_in_neither_slot_downloads_it(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    installer = _installer(tmp_path, bundle_server, bundles)
    installer.install(bundles.v2.ref)

    outcome = installer.rollback(bundles.v1.ref)

    assert (outcome.phase, outcome.current_bundle, outcome.downloaded) == ("rolled_back", bundles.v1.ref.id, True)


def _resigned_with_manifest(source, dest, private_key, change) -> BundleRef:
    """`source` with its manifest JSON changed by `change` (which may break its shape), re-signed with `private_key`."""
    document = resign_with_manifest(source, dest, private_key, change)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    return BundleRef(id=digest, name=document["name"], version=document["version"], profile=document["profile"],
                     sha256=digest, size=dest.stat().st_size, url=f"/api/v1/bundles/{digest}/download")


def test_a_signed_bundle_whose_manifest_lacks_a_field_is_refused_naming_it(tmp_path, bundle_server, bundles):
    _serve_all(bundle_server, bundles)
    ref = _resigned_with_manifest(bundles.v2.path, tmp_path / "no-inputs.edgepack",
                                  bundles.keys_dir / "edgepack.key",
                                  lambda manifest: manifest["io"].pop("inputs"))
    bundle_server.files[ref.id] = tmp_path / "no-inputs.edgepack"
    installer = _installer(tmp_path, bundle_server, bundles)
    installer.install(bundles.v1.ref)

    outcome = installer.install(ref)

    assert outcome.phase == "failed"
    assert outcome.error == "bundle refused: manifest.json: field 'io.inputs' is missing"
    assert outcome.current_bundle == bundles.v1.ref.id
    assert installer.state.active_bundle().version == "1.0.0"
