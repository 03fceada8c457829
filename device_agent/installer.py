"""A/B install and rollback: what the agent does with a desired state, step by step.

install(ref):   downloading → verifying → installing → selftest → active
    1. already active → nothing to do; already in the other slot, verified → switch, no download
    2. download into downloads/<id>.part (resumes), size and sha256 against the BundleRef
    3. open_bundle against the trusted keys (signature, paths, every member's hash), then the manifest's
       profile (or one of its aliases) must be this device's, and its runtime must run here
    4. empty the inactive slot (the pointer stops naming it first), extract into it
    5. the bundle's self-test in its runtime, within the timeout
    6. slot record, then the pointer switch (atomic); the old slot stays as the rollback target

rollback(ref):  verifying → rolled_back
    Switch the pointer to the slot that holds `ref` (default: the previous slot) after re-verifying it;
    no download. When neither slot holds it, it is installed like any bundle (a download) so the device
    still converges on what the fleet wants.

A refused bundle (signature, hash, profile, runtime, self-test) ends in `failed` with the reason while
the active slot stays untouched. Every step calls the state's fault hook, so tests can crash there.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgepack.bundle import VerifiedBundle, open_bundle
from edgepack.errors import BundleError, EdgepackError
from edgepack.manifest import BundleManifest
from edgepack.protocol import BundleRef

from device_agent.downloader import Downloader, DownloadError, DownloadRefused
from device_agent.runtimes import RuntimeUnavailable, adapter_for
from device_agent.selftest import SelftestResult, run_selftest
from device_agent.state import AgentState, SlotRecord

log = logging.getLogger(__name__)

PhaseCallback = Callable[[str], None]
Outcome = Literal["active", "rolled_back", "failed"]


@dataclass(frozen=True)
class InstallOutcome:
    """How an install or rollback ended, and what the device runs now."""

    phase: Outcome
    current_bundle: str | None
    previous_bundle: str | None
    error: str | None = None
    retryable: bool = False  # the network failed, not the bundle: try the same desired state again later
    downloaded: bool = False
    switched: bool = False
    selftest: SelftestResult | None = None


def profile_matches(manifest: BundleManifest, device_profile: str) -> bool:
    """A bundle fits a device when the device's profile is the bundle's profile or one of its aliases."""
    return device_profile == manifest.profile or device_profile in manifest.profile_aliases


class Installer:
    """Installs and rolls back bundles in an `AgentState`; one operation at a time (the agent's worker)."""

    def __init__(self, state: AgentState, downloader: Downloader, *, profile: str, selftest_timeout_s: float = 60.0,
                 selftest_isolation: Literal["process", "thread"] = "process") -> None:
        self.state = state
        self.downloader = downloader
        self.profile = profile
        self.selftest_timeout_s = selftest_timeout_s
        self.selftest_isolation = selftest_isolation

    # -- install -------------------------------------------------------------------------------------

    def install(self, ref: BundleRef, on_phase: PhaseCallback = lambda phase: None, *,
                final_phase: Outcome = "active") -> InstallOutcome:
        pointer = self.state.read_pointer()
        if pointer.active is not None and pointer.active.bundle_id == ref.id:
            return self._outcome(final_phase)

        other = self.state.slot_holding(ref.id)
        if other is not None and (pointer.active is None or other != pointer.active.slot):
            on_phase("verifying")
            try:
                self.state.switch_to(other, ref.id)
                log.info("bundle %s was already installed in slot %s: switched without a download", ref.id[:12], other)
                return self._outcome(final_phase, switched=True)
            except BundleError as exc:
                log.warning("slot %s no longer verifies (%s); installing %s afresh", other, exc, ref.id[:12])

        fetched = self._fetch_checked(ref, on_phase)
        if isinstance(fetched, InstallOutcome):
            return fetched
        bundle = fetched
        manifest = bundle.manifest
        self.state.fault("install.verified")

        on_phase("installing")
        slot = self.state.inactive_slot()
        slot_dir = self.state.slot_dir(slot)
        try:
            self.state.clear_slot(slot)
            self.state.fault("install.cleared")
            bundle.extract(slot_dir)
        except (EdgepackError, OSError) as exc:
            shutil.rmtree(slot_dir, ignore_errors=True)
            reason = exc.message if isinstance(exc, EdgepackError) else (exc.strerror or str(exc))
            return self._failed(f"cannot unpack into slot {slot}: {reason}", downloaded=True)
        self.state.fault("install.extracted")

        on_phase("selftest")
        result = run_selftest(slot_dir, timeout_s=self.selftest_timeout_s, isolation=self.selftest_isolation)
        self.state.fault("install.selftested")
        if not result.passed:
            self.state.clear_slot(slot)
            self.state.discard_downloads()
            return self._failed(f"self-test failed: {result.reason}", downloaded=True, selftest=result)

        record = SlotRecord(bundle_id=ref.id, name=manifest.name, version=manifest.version,
                            profile=manifest.profile, runtime=manifest.runtime, installed_at=time.time(),
                            selftest={"passed": True, "cases": result.cases, "seconds": round(result.seconds, 3)})
        self.state.write_slot_record(slot, record)
        self.state.fault("install.recorded")
        self.state.switch_to(slot, ref.id)
        self.state.fault("install.switched")
        self.state.discard_downloads()
        log.info("installed %s %s (%s) in slot %s", record.name, record.version, ref.id[:12], slot)
        return self._outcome(final_phase, downloaded=True, switched=True, selftest=result)

    def _fetch_checked(self, ref: BundleRef, on_phase: PhaseCallback) -> VerifiedBundle | InstallOutcome:
        """Download `ref` and check it for this device (signature, hashes, profile, runtime); a failed outcome if not."""
        on_phase("downloading")
        try:
            bundle_path = self.downloader.fetch(ref).path
        except DownloadRefused as exc:
            self.state.discard_downloads()
            return self._failed(f"download refused: {exc.message}")
        except DownloadError as exc:
            return self._failed(exc.message, retryable=True)
        self.state.fault("install.downloaded")

        on_phase("verifying")
        try:
            bundle = open_bundle(bundle_path, self.state.trusted_keys)
        except BundleError as exc:
            self.state.discard_downloads()
            return self._failed(f"bundle refused: {exc.message}", downloaded=True)
        manifest = bundle.manifest
        if not profile_matches(manifest, self.profile):
            self.state.discard_downloads()
            aliases = manifest.profile_aliases
            also = f" (aliases: {', '.join(aliases)})" if aliases else ""
            return self._failed(f"bundle refused: built for profile {manifest.profile!r}{also}, "
                                f"this device is {self.profile!r}", downloaded=True)
        try:
            adapter_for(manifest.runtime)
        except RuntimeUnavailable as exc:
            self.state.discard_downloads()
            return self._failed(f"bundle refused: {exc.message}", downloaded=True)
        return bundle

    # -- staging (shadow mode) -----------------------------------------------------------------------

    def stage(self, ref: BundleRef, target_dir: Path, on_phase: PhaseCallback = lambda phase: None) -> InstallOutcome:
        """Download, verify, unpack and self-test `ref` into `target_dir`, outside the slots: nothing switches.

        Shadow mode runs its candidate from there. Ends in `active` (the active bundle is unchanged) or
        `failed`; the downloaded file is kept, so installing the same bundle later needs no download.
        """
        fetched = self._fetch_checked(ref, on_phase)
        if isinstance(fetched, InstallOutcome):
            return fetched
        on_phase("installing")
        target_dir = Path(target_dir)
        try:
            shutil.rmtree(target_dir, ignore_errors=True)
            target_dir.parent.mkdir(parents=True, exist_ok=True)
            fetched.extract(target_dir)
        except (EdgepackError, OSError) as exc:
            shutil.rmtree(target_dir, ignore_errors=True)
            reason = exc.message if isinstance(exc, EdgepackError) else (exc.strerror or str(exc))
            return self._failed(f"cannot unpack into {target_dir}: {reason}", downloaded=True)
        on_phase("selftest")
        result = run_selftest(target_dir, timeout_s=self.selftest_timeout_s, isolation=self.selftest_isolation)
        if not result.passed:
            shutil.rmtree(target_dir, ignore_errors=True)
            self.state.discard_downloads()
            return self._failed(f"self-test failed: {result.reason}", downloaded=True, selftest=result)
        self.state.discard_downloads(keep=ref.id)
        return self._outcome("active", downloaded=True, selftest=result)

    # -- rollback ------------------------------------------------------------------------------------

    def rollback(self, ref: BundleRef | None, on_phase: PhaseCallback = lambda phase: None) -> InstallOutcome:
        """Back to `ref` (or to the previous slot when None) without a download when a slot holds it."""
        pointer = self.state.read_pointer()
        if ref is None:
            if pointer.previous is None:
                return self._failed("no previous bundle to roll back to")
            target_id = pointer.previous.bundle_id
        else:
            target_id = ref.id
        if pointer.active is not None and pointer.active.bundle_id == target_id:
            return self._outcome("rolled_back")

        slot = self.state.slot_holding(target_id)
        if slot is not None:
            on_phase("verifying")
            try:
                self.state.switch_to(slot, target_id)
                self.state.fault("rollback.switched")
                log.info("rolled back to %s in slot %s without a download", target_id[:12], slot)
                return self._outcome("rolled_back", switched=True)
            except BundleError as exc:
                if ref is None:
                    return self._failed(f"cannot roll back: slot {slot} does not verify: {exc.message}")
                log.warning("rollback slot %s does not verify (%s); downloading %s again", slot, exc, target_id[:12])
        elif ref is None:
            return self._failed(f"cannot roll back: no slot holds bundle {target_id[:12]}")
        return self.install(ref, on_phase, final_phase="rolled_back")

    # -- helpers -------------------------------------------------------------------------------------

    def _outcome(self, phase: Outcome, **facts: object) -> InstallOutcome:
        pointer = self.state.read_pointer()
        return InstallOutcome(phase=phase,
                              current_bundle=pointer.active.bundle_id if pointer.active else None,
                              previous_bundle=pointer.previous.bundle_id if pointer.previous else None,
                              **facts)  # type: ignore[arg-type]

    def _failed(self, error: str, **facts: object) -> InstallOutcome:
        log.warning("install failed: %s", error)
        return self._outcome("failed", error=error, **facts)
