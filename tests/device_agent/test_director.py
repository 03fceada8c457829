"""The agent's checks on desired states: the pinned fleet key, addressing, expiry, replay, anti-rollback."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack.protocol import BundleRef, DesiredState, decode, encode
from device_agent.director import (
    CLOCK_SKEW_S, DesiredVerifier, PinnedKeyError, compare_versions, downgrade_refusal, load_pinned_key,
)
from fleet.director import FleetDirector

NOW = 1_700_000_000.0
SHA = "ab" * 32


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ref(version: str, name: str = "digits") -> BundleRef:
    return BundleRef(id=SHA, name=name, version=version, profile="rpi4", sha256=SHA, size=1, url="/b")


def state(seq: int = 5, action: str = "install", version: str = "2.0.0") -> DesiredState:
    return DesiredState(rollout_id="r-1", seq=seq, action=action, bundle=ref(version))


@pytest.fixture
def director() -> FleetDirector:
    return FleetDirector(Ed25519PrivateKey.generate(), validity_s=3600)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def verifier_for(director: FleetDirector, clock: Clock, device_id: str = "dev-1", **options) -> DesiredVerifier:
    return DesiredVerifier(device_id, director.public().model_dump(), clock=clock, **options)


def test_a_state_the_fleet_signed_for_this_device_is_accepted_after_a_trip_over_the_wire(director, clock):
    signed = director.sign(state(), device_id="dev-1", now=NOW)
    received = decode(DesiredState, encode(signed))

    assert verifier_for(director, clock).check(received) is None
    assert received.device_id == "dev-1" and received.expires_at == NOW + 3600


@pytest.mark.parametrize("forge, reason", [
    (lambda d, s: state(seq=10**9), "it is not signed"),
    (lambda d, s: FleetDirector(Ed25519PrivateKey.generate()).sign(state(seq=10**9), device_id="dev-1", now=NOW),
     "signed by key"),
    (lambda d, s: s.model_copy(update={"seq": 10**9}), "its signature does not match"),
    (lambda d, s: s.model_copy(update={"bundle": ref("0.1.0")}), "its signature does not match"),
    (lambda d, s: s.model_copy(update={"action": "rollback"}), "its signature does not match"),
    (lambda d, s: d.sign(state(), device_id="dev-2", now=NOW), "addressed to device dev-2"),
])
def test_forged_or_redirected_states_are_refused_with_a_reason(director, clock, forge, reason):
    signed = director.sign(state(), device_id="dev-1", now=NOW)
    refusal = verifier_for(director, clock).check(forge(director, signed))

    assert refusal is not None and refusal.startswith("refused desired state seq ")
    assert reason in refusal


def test_an_expired_state_is_refused_a_refreshed_copy_of_it_is_not(director, clock):
    verifier = verifier_for(director, clock)
    signed = director.sign(state(), device_id="dev-1", now=NOW)

    clock.now = NOW + 3600 + CLOCK_SKEW_S + 1
    assert "expired" in verifier.check(signed)
    assert director.needs_refresh(signed, NOW + 1801) and not director.needs_refresh(signed, NOW + 1799)
    refreshed = director.sign(signed, device_id="dev-1", now=clock.now)
    assert refreshed.seq == signed.seq and verifier.check(refreshed) is None


def test_a_state_older_than_the_maximum_age_or_than_one_accepted_is_refused(director, clock):
    long_lived = FleetDirector(Ed25519PrivateKey.generate(), validity_s=10 * 86400)
    verifier = DesiredVerifier("dev-1", long_lived.public().model_dump(), clock=clock, max_age_s=86400)
    old = long_lived.sign(state(seq=5), device_id="dev-1", now=NOW - 2 * 86400)
    assert "maximum age" in verifier.check(old)

    newer = long_lived.sign(state(seq=6), device_id="dev-1", now=NOW)
    assert verifier.check(newer) is None
    verifier.accepted(newer)
    replay = long_lived.sign(state(seq=7), device_id="dev-1", now=NOW - 60)
    assert "replay" in verifier.check(replay)


def test_a_state_from_the_future_past_the_clock_skew_is_refused(director, clock):
    ahead = director.sign(state(), device_id="dev-1", now=NOW + CLOCK_SKEW_S + 60)
    assert "in the future" in verifier_for(director, clock).check(ahead)


def test_without_a_pinned_key_unsigned_states_pass_unless_signatures_are_required(clock):
    assert DesiredVerifier("dev-1", None, clock=clock).check(state()) is None
    assert "addressed to device dev-2" in DesiredVerifier("dev-1", None, clock=clock).check(
        state().model_copy(update={"device_id": "dev-2"}))
    assert "no fleet key is pinned" in DesiredVerifier("dev-1", None, require_signed=True, clock=clock).check(state())


def test_a_pinned_key_document_must_be_an_ed25519_key_matching_its_id(director):
    document = director.public().model_dump()
    assert load_pinned_key(document)[0] == director.key_id
    for broken in ({**document, "key_id": "0" * 16}, {**document, "public_key": "not base64!"},
                   {**document, "public_key": "AAAA"}, {**document, "alg": "rsa"}):
        with pytest.raises(PinnedKeyError):
            load_pinned_key(broken)


@pytest.mark.parametrize("lower, higher", [
    ("1.9.0", "1.10.0"), ("1.0", "1.0.1"), ("1.0.0rc1", "1.0.0"), ("1.0.0-rc.1", "1.0.0"), ("1.0.0a1", "1.0.0b1"),
    ("1.0.0.dev1", "1.0.0a1"), ("1.0.0", "1.0.0.post1"), ("v1.2.3", "1.2.4"), ("2", "10"),
])
def test_versions_compare_as_release_numbers(lower, higher):
    assert compare_versions(lower, higher) == -1
    assert compare_versions(higher, lower) == 1


def test_equal_and_unreadable_versions():
    assert compare_versions("1.0", "1.0.0") == 0
    assert compare_versions("1.0.0-rc.1", "1.0.0rc1") == 0
    assert compare_versions("1.0.0+build5", "1.0.0") == 0
    assert compare_versions("nightly", "1.0.0") is None


def test_only_a_rollback_may_install_a_lower_version_of_the_same_bundle():
    assert "refused to downgrade digits 2.0.0 to 1.0.0" in downgrade_refusal(state(version="1.0.0"), "digits", "2.0.0")
    assert downgrade_refusal(state(action="rollback", version="1.0.0"), "digits", "2.0.0") is None
    assert downgrade_refusal(state(version="2.0.0"), "digits", "2.0.0") is None  # a reinstall
    assert downgrade_refusal(state(version="3.0.0"), "digits", "2.0.0") is None
    assert downgrade_refusal(state(version="1.0.0"), "other", "2.0.0") is None
    assert downgrade_refusal(state(version="1.0.0"), None, None) is None
    assert downgrade_refusal(state(version="nightly"), "digits", "2.0.0") is None


def test_key_rotation_the_current_key_announces_the_next_which_then_replaces_it(clock):
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    during = FleetDirector(old, validity_s=3600, next_key=new)
    after = FleetDirector(new, validity_s=3600)
    verifier = DesiredVerifier("dev-1", FleetDirector(old).public().model_dump(), clock=clock)
    assert "signed by key" in verifier.check(after.sign(state(seq=9), device_id="dev-1", now=NOW))  # not yet known

    announcing = during.sign(state(seq=5), device_id="dev-1", now=NOW)
    assert announcing.next_key.key_id == after.key_id and verifier.check(announcing) is None
    assert verifier.accepted(announcing) is True  # the keys changed: the agent writes fleet_key.json
    pinned = verifier.pinned_document()
    assert (pinned["key_id"], pinned["next"]["key_id"]) == (during.key_id, after.key_id)
    assert verifier.accepted(announcing) is False  # once is enough

    # A restarted agent reads both keys back; the first state signed by the next key retires the old one.
    restarted = DesiredVerifier("dev-1", pinned, clock=clock)
    assert restarted.check(during.sign(state(seq=6), device_id="dev-1", now=NOW)) is None
    by_new = after.sign(state(seq=7), device_id="dev-1", now=NOW)
    assert restarted.check(by_new) is None and restarted.accepted(by_new) is True
    assert restarted.pinned_document() == {**after.public().model_dump(), "next": None}
    assert "signed by key" in restarted.check(during.sign(state(seq=8), device_id="dev-1", now=NOW))


def test_a_next_key_announced_by_a_forger_is_never_pinned(director, clock):
    verifier = verifier_for(director, clock)
    forger = FleetDirector(Ed25519PrivateKey.generate(), next_key=Ed25519PrivateKey.generate())
    forged = forger.sign(state(), device_id="dev-1", now=NOW)

    assert "signed by key" in verifier.check(forged)
    tampered = director.sign(state(), device_id="dev-1", now=NOW).model_copy(update={"next_key": forged.next_key})
    assert "does not match" in verifier.check(tampered)
