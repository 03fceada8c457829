"""What the agent checks before it acts on a desired state (the fleet is TUF's director; this is the client).

    verifier = DesiredVerifier("cam-017", pinned=state.read_fleet_key(), max_age_s=30 * 86400)
    reason = verifier.check(desired)          # None: act on it; else a one-line reason to refuse and report
    reason = downgrade_refusal(desired, active_bundle)   # at install time: a lower version is only a rollback's

The fleet key is pinned at enrollment (`fleet_key.json` in the state folder). With it, a desired state is
refused when it is unsigned, signed by another key, does not match its signature, is addressed to
another device, has expired (`expires_at`), was issued longer than `max_age_s` ago, or was issued before
the newest state this agent accepted (a replay). A refused state never moves the agent's seq floor, so a
forged state with a huge seq cannot freeze the device out of the fleet's next one.

Key rotation: a state signed by the pinned key may announce the fleet's next key (`next_key`); the agent
pins it beside the current one (`learn`, which the agent also applies to states at or below its seq floor,
since that is how finished devices hear of it). Both keys verify until the first valid state signed by the
next key, which retires the old one.

An agent without a pinned key (enrolled by a fleet that handed none out) accepts unsigned states unless
`require_signed` is set: that is the switch that makes signatures mandatory for such devices.

Anti-rollback: an `install` of a bundle with the same name as the active one and a lower version is
refused; only a `rollback` — which the fleet issues when a rollout is rolled back — may go down.
Versions compare as release numbers (1.10 > 1.9, 1.0 == 1.0.0) with pre-releases before the release
(1.0.0.dev1 < 1.0.0a1 < 1.0.0b1 < 1.0.0rc1 == 1.0.0-rc.1 < 1.0.0 < 1.0.0.post1); a version neither
scheme reads is compared by nothing, so it is never refused as a downgrade (and never lets one through
that a readable pair would refuse).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgepack.protocol import DesiredState, signing_bytes
from edgepack.signing import SIGNATURE_ALG, decode_public_key, key_id

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 30 * 24 * 3600.0
# Device clocks drift (an RTC-less board before NTP): a state "issued in the future" by this much is fine.
CLOCK_SKEW_S = 300.0


class PinnedKeyError(ValueError):
    """The pinned fleet key document is not one this agent can use."""


def load_pinned_key(document: dict[str, Any]) -> tuple[str, Ed25519PublicKey]:
    """(key id, key) of a `fleet_key` document ({alg, key_id, public_key}); the key id is recomputed from
    the key, so a document that names one key and carries another is refused."""
    if not isinstance(document, dict):
        raise PinnedKeyError("fleet key is not a JSON object")
    if document.get("alg", SIGNATURE_ALG) != SIGNATURE_ALG:
        raise PinnedKeyError(f"fleet key alg {document.get('alg')!r} is not {SIGNATURE_ALG!r}")
    try:
        public_key = decode_public_key(str(document.get("public_key", "")))
    except ValueError as exc:
        raise PinnedKeyError(f"fleet key: {exc}") from None
    actual = key_id(public_key)
    if document.get("key_id") not in (None, actual):
        raise PinnedKeyError(f"fleet key id {document.get('key_id')!r} does not match its key ({actual})")
    return actual, public_key


class DesiredVerifier:
    """Decides whether a desired state may be acted on; thread-safe enough for paho's one network thread."""

    def __init__(self, device_id: str, pinned: dict[str, Any] | None, *, require_signed: bool = False,
                 max_age_s: float = DEFAULT_MAX_AGE_S, clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.require_signed = require_signed
        self.max_age_s = max_age_s
        self.clock = clock
        self.key_id: str | None = None
        self._key: Ed25519PublicKey | None = None
        self.next_key_id: str | None = None
        self._next: tuple[dict[str, Any], Ed25519PublicKey] | None = None
        self._document: dict[str, Any] | None = None
        self.newest_issued_at = 0.0
        if pinned is not None:
            self.key_id, self._key = load_pinned_key(pinned)
            self._document = {k: pinned[k] for k in ("alg", "key_id", "public_key") if k in pinned}
            if pinned.get("next") is not None:
                self.next_key_id, next_key = load_pinned_key(pinned["next"])
                self._next = (dict(pinned["next"]), next_key)

    @property
    def pinned(self) -> bool:
        return self._key is not None

    def check(self, desired: DesiredState) -> str | None:
        """None when `desired` may be acted on; otherwise why it is refused (one line, names the seq)."""
        reason = self._signature_problem(desired) or self._freshness_problem(desired)
        return f"refused desired state seq {desired.seq}: {reason}" if reason else None

    def accepted(self, desired: DesiredState) -> bool:
        """Remember an accepted state's issue time (an older one is a replay from now on) and what it says
        about the keys (`learn`); True when the pinned keys changed and should be written down."""
        if self._key is None:
            return False
        self.newest_issued_at = max(self.newest_issued_at, desired.issued_at)
        return self.learn(desired)

    def learn(self, desired: DesiredState) -> bool:
        """Key rotation from a state `check` accepted: pin the next key it announces (signed by the current
        key), or, signed by the next key, make that one current. True when the pinned keys changed."""
        if self._key is None or desired.sig is None:
            return False
        if self._next is not None and desired.sig.key_id == self.next_key_id:
            document, self._key = self._next
            self.key_id, self._document = self.next_key_id, document
            self._next, self.next_key_id = None, None
            log.info("fleet key rotated: now %s", self.key_id)
            return True
        announced = desired.next_key
        if announced is None or desired.sig.key_id != self.key_id or announced.key_id in (self.key_id, self.next_key_id):
            return False
        document = announced.model_dump(mode="json")
        try:
            next_id, next_key = load_pinned_key(document)
        except PinnedKeyError as exc:
            log.warning("ignored the next fleet key announced in seq %d: %s", desired.seq, exc)
            return False
        self._next, self.next_key_id = (document, next_key), next_id
        log.info("pinned the next fleet key %s beside %s", next_id, self.key_id)
        return True

    def key_ids(self) -> list[str]:
        """The pinned key ids: the current one, then the next during a rotation."""
        return [k for k in (self.key_id, self.next_key_id) if k]

    def pinned_document(self) -> dict[str, Any] | None:
        """What `fleet_key.json` should hold now: the current key and, during a rotation, the next."""
        if self._document is None:
            return None
        return {**self._document, "next": self._next[0] if self._next else None}

    def _signature_problem(self, desired: DesiredState) -> str | None:
        if self._key is None:
            if self.require_signed:
                return "no fleet key is pinned (enroll again) and signed desired states are required"
            return None  # no pinned key: the device was enrolled before the fleet signed; see the module doc
        if desired.sig is None:
            return "it is not signed"
        key = self._key if desired.sig.key_id == self.key_id else (
            self._next[1] if self._next is not None and desired.sig.key_id == self.next_key_id else None)
        if key is None:
            return f"signed by key {desired.sig.key_id}, not the pinned fleet key {self.key_id}"
        try:
            signature = base64.b64decode(desired.sig.sig, validate=True)
        except (binascii.Error, ValueError):
            return "its signature is not valid base64"
        try:
            key.verify(signature, signing_bytes(desired))
        except InvalidSignature:
            return f"its signature does not match (key {desired.sig.key_id}; altered in transit?)"
        return None

    def _freshness_problem(self, desired: DesiredState) -> str | None:
        if desired.device_id is not None and desired.device_id != self.device_id:
            return f"it is addressed to device {desired.device_id}"
        if self._key is None:
            return None  # unsigned fields prove nothing; checking them would only break old fleets
        if desired.device_id is None:
            return "it names no device"
        now = self.clock()
        if desired.expires_at is None:
            return "it has no expiry"
        if now > desired.expires_at + CLOCK_SKEW_S:
            return f"it expired {now - desired.expires_at:.0f} s ago (a replayed or frozen state)"
        if now - desired.issued_at > self.max_age_s:
            return f"it was issued {now - desired.issued_at:.0f} s ago, over the {self.max_age_s:.0f} s maximum age"
        if desired.issued_at > now + CLOCK_SKEW_S:
            return f"it was issued {desired.issued_at - now:.0f} s in the future (check the device clock)"
        if desired.issued_at < self.newest_issued_at:
            return "it was issued before a state this device already accepted (a replay)"
        return None


# ---------------------------------------------------------------------------------------- versions

_VERSION = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>dev|a|alpha|b|beta|c|rc|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:[-_.]?(?:post|rev|r)[-_.]?(?P<post>\d+))?"
    r"(?:\+[0-9A-Za-z.-]+)?$",
    re.IGNORECASE,
)
_PRE_RANK = {"dev": 0, "a": 1, "alpha": 1, "b": 2, "beta": 2, "c": 3, "rc": 3, "pre": 3, "preview": 3}
_FINAL = 4  # after every pre-release


def version_key(version: str) -> tuple | None:
    """A sortable key of a PEP 440 or semver version string; None when it is neither."""
    match = _VERSION.match(version.strip())
    if match is None:
        return None
    release = [int(part) for part in match["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()  # 1.0 == 1.0.0
    pre = match["pre"]
    rank = _PRE_RANK[pre.lower()] if pre else _FINAL
    return (tuple(release), rank, int(match["pre_n"] or 0), int(match["post"] or 0))


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as `a` is lower, equal or higher than `b`; None when either cannot be read."""
    key_a, key_b = version_key(a), version_key(b)
    if key_a is None or key_b is None:
        return None
    return (key_a > key_b) - (key_a < key_b)


def downgrade_refusal(desired: DesiredState, active_name: str | None, active_version: str | None) -> str | None:
    """Why an `install` of `desired.bundle` over the active bundle is a downgrade this agent refuses; None
    when it is not one (another name, a higher or equal version, a rollback, nothing active)."""
    bundle = desired.bundle
    if desired.action != "install" or bundle is None or active_name is None or active_version is None:
        return None
    if bundle.name != active_name:
        return None
    order = compare_versions(bundle.version, active_version)
    if order is None:
        log.info("cannot compare versions %r and %r of %s; not treating it as a downgrade",
                 bundle.version, active_version, bundle.name)
        return None
    if order >= 0:
        return None
    return (f"refused to downgrade {bundle.name} {active_version} to {bundle.version}: only a rollback the fleet "
            f"issues for a rollout may install a lower version")


__all__ = ["CLOCK_SKEW_S", "DEFAULT_MAX_AGE_S", "DesiredVerifier", "PinnedKeyError", "compare_versions",
           "downgrade_refusal", "load_pinned_key", "version_key"]
