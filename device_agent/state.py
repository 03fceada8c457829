"""The agent's state folder, and the rules that keep a verified model active through any crash.

    state_dir/
      credential              the device credential from enrollment (mode 0600)
      fleet_key.json          the fleet's director key, pinned at enrollment: {alg, key_id, public_key}
      current                 the pointer: JSON {"active": {"slot", "bundle_id"}, "previous": {…} | null}
      journal.json            the last desired state handled: seq, rollout_id, phase, error
      slots/a/  slots/b/      extracted bundles (manifest.json, manifest.sig, members)
      slots/a.json  b.json    slot records: which bundle a slot holds and that its self-test passed
      downloads/<id>.part     a download in progress (resumable); <id>.edgepack once complete

Invariants (every write is temp file → fsync → os.replace → fsync of the folder):

- `current` only ever names a slot whose record was written after its self-test passed.
- Before a slot is emptied for a new install, `current` stops naming it as the rollback target, so
  neither pointer field can reference a slot that is being rewritten.
- A slot record is removed before its folder, and written only after the folder is complete.

So a crash anywhere leaves `current` naming a complete, self-tested slot (or no slot before the first
install). `recover()` at start re-verifies the active slot against the trusted keys (signature and
every member's sha256), falls back to the previous slot if the active one is damaged, and clears
leftovers: temp files and half-extracted folders. Stale `.part` files are kept: they resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.bundle import manifest_from_bytes
from edgepack.errors import BundleError, ConfigError, IntegrityError, SignatureError
from edgepack.files import TEMP_SUFFIX, atomic_write, file_sha256_size, fsync_dir
from edgepack.manifest import BundleManifest
from edgepack.signing import verify_manifest_signature

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
POINTER_NAME = "current"
JOURNAL_NAME = "journal.json"
CREDENTIAL_NAME = "credential"
FLEET_KEY_NAME = "fleet_key.json"
STATE_SCHEMA = 1
_MAX_SMALL_JSON = 16 * 1024 * 1024

FaultHook = Callable[[str], None]
"""Called with a named point (e.g. "install.extracted"); tests raise or kill the process there."""


def _no_fault(point: str) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# atomic files


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, fault: FaultHook = _no_fault, point: str = "") -> None:
    """Replace `path` with `data` (edgepack.files.atomic_write), stopping at `<point>.temp_written` for crash tests."""
    before_replace = (lambda _temp: fault(f"{point}.temp_written")) if point else None
    atomic_write(path, data, mode=mode, before_replace=before_replace)


def _json_bytes(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, indent=1).encode() + b"\n"


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None when absent; a damaged file logs and reads as None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) > _MAX_SMALL_JSON:
        log.warning("%s is %d bytes, too large to be agent state; ignoring it", path, len(data))
        return None
    try:
        value = json.loads(data)
    except ValueError:
        log.warning("%s is not valid JSON; ignoring it", path)
        return None
    if not isinstance(value, dict):
        log.warning("%s is not a JSON object; ignoring it", path)
        return None
    return value


# ---------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class SlotRef:
    slot: str
    bundle_id: str


@dataclass(frozen=True)
class Pointer:
    """Which slot is active, and which holds the rollback target."""

    active: SlotRef | None
    previous: SlotRef | None = None

    def to_json(self) -> dict:
        def ref(value: SlotRef | None) -> dict | None:
            return None if value is None else {"slot": value.slot, "bundle_id": value.bundle_id}
        return {"schema_version": STATE_SCHEMA, "active": ref(self.active), "previous": ref(self.previous)}

    @classmethod
    def from_json(cls, document: dict) -> "Pointer":
        def ref(value: Any) -> SlotRef | None:
            if value is None:
                return None
            if not isinstance(value, dict) or value.get("slot") not in SLOTS or not isinstance(value.get("bundle_id"), str):
                raise ValueError(f"bad slot reference {value!r}")
            return SlotRef(value["slot"], value["bundle_id"])
        return cls(active=ref(document.get("active")), previous=ref(document.get("previous")))


@dataclass(frozen=True)
class SlotRecord:
    """Written beside a slot once its bundle is extracted and self-tested."""

    bundle_id: str
    name: str
    version: str
    profile: str
    runtime: str
    installed_at: float
    selftest: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema_version": STATE_SCHEMA, "bundle_id": self.bundle_id, "name": self.name, "version": self.version,
                "profile": self.profile, "runtime": self.runtime, "installed_at": self.installed_at, "selftest": self.selftest}

    @classmethod
    def from_json(cls, document: dict) -> "SlotRecord":
        return cls(bundle_id=str(document["bundle_id"]), name=str(document.get("name", "")),
                   version=str(document.get("version", "")), profile=str(document.get("profile", "")),
                   runtime=str(document.get("runtime", "")), installed_at=float(document.get("installed_at", 0.0)),
                   selftest=dict(document.get("selftest") or {}))


@dataclass(frozen=True)
class Journal:
    """The last desired state this device finished with (success or a final failure)."""

    last_seq: int = -1
    rollout_id: str | None = None
    phase: str = "idle"
    error: str | None = None
    bundle_id: str | None = None
    updated_at: float = 0.0

    def to_json(self) -> dict:
        return {"schema_version": STATE_SCHEMA, "last_seq": self.last_seq, "rollout_id": self.rollout_id,
                "phase": self.phase, "error": self.error, "bundle_id": self.bundle_id, "updated_at": self.updated_at}

    @classmethod
    def from_json(cls, document: dict) -> "Journal":
        return cls(last_seq=int(document.get("last_seq", -1)), rollout_id=document.get("rollout_id"),
                   phase=str(document.get("phase", "idle")), error=document.get("error"),
                   bundle_id=document.get("bundle_id"), updated_at=float(document.get("updated_at", 0.0)))


@dataclass(frozen=True)
class ActiveBundle:
    """The bundle the device runs: where its files are and what its manifest says."""

    bundle_id: str
    slot: str
    path: Path
    manifest: BundleManifest
    record: SlotRecord

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def runtime(self) -> str:
        return self.manifest.runtime


@dataclass(frozen=True)
class RecoveryReport:
    """What `recover()` found and did, for the log and for tests."""

    active: SlotRef | None
    previous: SlotRef | None
    actions: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------
# slot verification


def _member_problem(name: str) -> str | None:
    if not name or name.startswith("/") or "\\" in name:
        return "not a relative POSIX path"
    parts = PurePosixPath(name).parts
    if ".." in parts or name != str(PurePosixPath(name)):
        return "not normalised or escapes the slot"
    return None


def verify_slot_dir(slot_dir: Path, trusted_keys: list) -> BundleManifest:
    """Check an extracted bundle as strictly as `open_bundle` checks the archive; return its manifest.

    Signature over manifest.json against the trusted keys, every listed member present as a regular
    file with the manifest's size and sha256, and nothing else in the folder (no links, no extras).
    """
    slot_dir = Path(slot_dir)
    if slot_dir.is_symlink() or not slot_dir.is_dir():
        raise BundleError(f"slot {slot_dir.name} is missing or not a folder")
    try:
        manifest_bytes = (slot_dir / "manifest.json").read_bytes()
        signature_doc = json.loads((slot_dir / "manifest.sig").read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"slot {slot_dir.name}: {Path(exc.filename).name} missing") from None
    except ValueError:
        raise SignatureError(f"slot {slot_dir.name}: manifest.sig is not valid JSON") from None
    verify_manifest_signature(manifest_bytes, signature_doc, trusted_keys)
    try:
        manifest = manifest_from_bytes(manifest_bytes)
    except BundleError as exc:
        raise BundleError(f"slot {slot_dir.name}: {exc.message}", **exc.context) from None

    expected = {"manifest.json", "manifest.sig"}
    for name, entry in sorted(manifest.files.items()):
        problem = _member_problem(name)
        if problem:
            raise BundleError(f"slot {slot_dir.name}: member {name!r} is {problem}")
        path = slot_dir.joinpath(*name.split("/"))
        if path.is_symlink() or not path.is_file():
            raise IntegrityError(f"slot {slot_dir.name}: {name} missing or not a regular file", member=name)
        digest, size = file_sha256_size(path)
        if size != entry.size or digest != entry.sha256:
            raise IntegrityError(f"slot {slot_dir.name}: {name} does not match the signed manifest", member=name)
        expected.add(name)
    for root, dirs, names in os.walk(slot_dir):
        for name in names + [d for d in dirs if (Path(root) / d).is_symlink()]:
            relative = (Path(root) / name).relative_to(slot_dir).as_posix()
            if relative not in expected:
                raise IntegrityError(f"slot {slot_dir.name}: unexpected file {relative}", member=relative)
    return manifest


# ---------------------------------------------------------------------------------------------------
# the state folder


class AgentState:
    """The agent's durable state; only the install worker mutates it, any thread may read it."""

    def __init__(self, state_dir: Path, trusted_keys: list, *, fault: FaultHook | None = None) -> None:
        self.root = Path(state_dir)
        self.trusted_keys = list(trusted_keys)
        self.fault: FaultHook = fault or _no_fault
        self.slots_dir = self.root / "slots"
        self.downloads_dir = self.root / "downloads"
        self.pointer_path = self.root / POINTER_NAME
        self.journal_path = self.root / JOURNAL_NAME
        self.credential_path = self.root / CREDENTIAL_NAME

    # -- layout --------------------------------------------------------------------------------------

    def ensure_layout(self) -> None:
        try:
            for directory in (self.root, self.slots_dir, self.downloads_dir):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the agent state folder {self.root}: {exc.strerror or exc}", path=self.root) from None

    def slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.slots_dir / slot

    def slot_record_path(self, slot: str) -> Path:
        return self.slots_dir / f"{slot}.json"

    def part_path(self, bundle_id: str) -> Path:
        return self.downloads_dir / f"{bundle_id}.part"

    def download_path(self, bundle_id: str) -> Path:
        return self.downloads_dir / f"{bundle_id}.edgepack"

    # -- credential ----------------------------------------------------------------------------------

    def read_credential(self) -> str | None:
        try:
            value = self.credential_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return value or None

    def write_credential(self, credential: str) -> None:
        write_atomic(self.credential_path, credential.encode() + b"\n", mode=0o600)

    def read_fleet_key(self) -> dict | None:
        """The pinned fleet key document, or None when the fleet that enrolled this device gave none. A file
        that is there but unreadable is a ConfigError: reading it as "no key" would accept unsigned states."""
        path = self.root / FLEET_KEY_NAME
        document = _read_json(path)
        if document is None and (path.exists() or path.is_symlink()):
            raise ConfigError(f"pinned fleet key {path} is damaged; remove the credential and enroll again",
                              path=path)
        return document

    def write_fleet_key(self, document: dict) -> None:
        write_atomic(self.root / FLEET_KEY_NAME, _json_bytes(document))

    # -- pointer and slot records --------------------------------------------------------------------

    def read_pointer(self) -> Pointer:
        document = _read_json(self.pointer_path)
        if document is None:
            return Pointer(active=None)
        try:
            return Pointer.from_json(document)
        except ValueError as exc:
            log.warning("%s is malformed (%s); treating it as absent", self.pointer_path, exc)
            return Pointer(active=None)

    def write_pointer(self, pointer: Pointer, *, point: str = "pointer") -> None:
        write_atomic(self.pointer_path, _json_bytes(pointer.to_json()), fault=self.fault, point=point)

    def read_slot_record(self, slot: str) -> SlotRecord | None:
        document = _read_json(self.slot_record_path(slot))
        if document is None:
            return None
        try:
            return SlotRecord.from_json(document)
        except (KeyError, TypeError, ValueError):
            log.warning("slot record %s is malformed; treating the slot as empty", self.slot_record_path(slot))
            return None

    def write_slot_record(self, slot: str, record: SlotRecord) -> None:
        write_atomic(self.slot_record_path(slot), _json_bytes(record.to_json()), fault=self.fault, point=f"slot_record.{slot}")

    def verify_slot(self, slot: str, bundle_id: str | None = None) -> tuple[SlotRecord, BundleManifest]:
        """(record, manifest) of a slot that holds a complete, self-tested, signed bundle; BundleError if not."""
        record = self.read_slot_record(slot)
        if record is None:
            raise BundleError(f"slot {slot} holds no installed bundle")
        if bundle_id is not None and record.bundle_id != bundle_id:
            raise BundleError(f"slot {slot} holds bundle {record.bundle_id[:12]}, not {bundle_id[:12]}")
        manifest = verify_slot_dir(self.slot_dir(slot), self.trusted_keys)
        return record, manifest

    def slot_holding(self, bundle_id: str) -> str | None:
        """The slot whose record names `bundle_id` (not yet re-verified), if any."""
        for slot in SLOTS:
            record = self.read_slot_record(slot)
            if record is not None and record.bundle_id == bundle_id:
                return slot
        return None

    def inactive_slot(self) -> str:
        active = self.read_pointer().active
        return "a" if active is None or active.slot == "b" else "b"

    def active_bundle(self) -> ActiveBundle | None:
        """The active bundle as the pointer names it (without re-hashing; `recover` did that at start)."""
        active = self.read_pointer().active
        if active is None:
            return None
        record = self.read_slot_record(active.slot)
        manifest = _read_slot_manifest(self.slot_dir(active.slot))
        if record is None or manifest is None or record.bundle_id != active.bundle_id:
            return None
        return ActiveBundle(bundle_id=active.bundle_id, slot=active.slot, path=self.slot_dir(active.slot),
                            manifest=manifest, record=record)

    # -- the steps of an install ---------------------------------------------------------------------

    def clear_slot(self, slot: str) -> None:
        """Empty `slot` for a new install: first stop the pointer naming it, then its record, then its files."""
        pointer = self.read_pointer()
        if pointer.active is not None and pointer.active.slot == slot:
            raise BundleError(f"refusing to clear slot {slot}: it is the active slot")
        if pointer.previous is not None and pointer.previous.slot == slot:
            self.write_pointer(Pointer(active=pointer.active, previous=None), point="pointer.drop_previous")
            self.fault("clear.pointer_dropped_previous")
        self.slot_record_path(slot).unlink(missing_ok=True)
        self.fault("clear.record_removed")
        shutil.rmtree(self.slot_dir(slot), ignore_errors=True)
        self._remove_staging(slot)
        fsync_dir(self.slots_dir)
        self.fault("clear.files_removed")

    def switch_to(self, slot: str, bundle_id: str) -> Pointer:
        """Make `slot` active (it must verify); the slot active before becomes the rollback target."""
        self.verify_slot(slot, bundle_id)
        old = self.read_pointer().active
        previous = old if old is not None and old.slot != slot else None
        pointer = Pointer(active=SlotRef(slot, bundle_id), previous=previous)
        self.write_pointer(pointer, point="pointer.switch")
        self.fault("switch.pointer_written")
        return pointer

    # -- journal -------------------------------------------------------------------------------------

    def read_journal(self) -> Journal:
        document = _read_json(self.journal_path)
        if document is None:
            return Journal()
        try:
            return Journal.from_json(document)
        except (TypeError, ValueError):
            log.warning("%s is malformed; starting a fresh journal", self.journal_path)
            return Journal()

    def write_journal(self, journal: Journal) -> None:
        write_atomic(self.journal_path, _json_bytes(journal.to_json()), fault=self.fault, point="journal")

    # -- downloads -----------------------------------------------------------------------------------

    def discard_downloads(self, keep: str | None = None) -> None:
        """Remove finished and partial downloads, except those of bundle `keep`."""
        for path in self.downloads_dir.iterdir():
            if keep is not None and path.name.startswith(keep + "."):
                continue
            if path.is_file():
                path.unlink(missing_ok=True)

    # -- start-up ------------------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Bring the folder to its invariants after whatever happened before this start."""
        self.ensure_layout()
        actions: list[str] = []
        folders = (self.root, self.slots_dir, self.downloads_dir)
        for leftover in [temp for folder in folders for temp in folder.glob(f".*{TEMP_SUFFIX}")]:
            leftover.unlink(missing_ok=True)
            actions.append(f"removed temp file {leftover.name}")
        for slot in SLOTS:
            if self._remove_staging(slot):
                actions.append(f"removed a half-extracted copy of slot {slot}")

        pointer = self.read_pointer()
        active, previous = pointer.active, pointer.previous
        if active is not None and not self._slot_ok(active, actions, "active"):
            if previous is not None and self._slot_ok(previous, actions, "previous"):
                actions.append(f"fell back to slot {previous.slot} ({previous.bundle_id[:12]})")
                active, previous = previous, None
            else:
                actions.append("no verified slot left: no model is active until the next install")
                active, previous = None, None
        elif previous is not None and not self._slot_ok(previous, actions, "previous"):
            actions.append(f"slot {previous.slot} is no longer a rollback target")
            previous = None
        if (active, previous) != (pointer.active, pointer.previous):
            self.write_pointer(Pointer(active=active, previous=previous), point="pointer.recover")

        # A slot the pointer does not name may be half-written; drop its record so nothing trusts it.
        named = {ref.slot for ref in (active, previous) if ref is not None}
        for slot in SLOTS:
            if slot not in named and self.slot_record_path(slot).exists():
                record = self.read_slot_record(slot)
                try:
                    if record is None:
                        raise BundleError("malformed record")
                    verify_slot_dir(self.slot_dir(slot), self.trusted_keys)
                except (BundleError, OSError) as exc:
                    self.slot_record_path(slot).unlink(missing_ok=True)
                    actions.append(f"forgot slot {slot}: {exc}")
        for line in actions:
            log.info("state recovery: %s", line)
        return RecoveryReport(active=active, previous=previous, actions=tuple(actions))

    def _slot_ok(self, ref: SlotRef, actions: list[str], role: str) -> bool:
        try:
            self.verify_slot(ref.slot, ref.bundle_id)
            return True
        except (BundleError, OSError) as exc:
            actions.append(f"{role} slot {ref.slot} does not verify: {exc}")
            return False

    def _remove_staging(self, slot: str) -> bool:
        # VerifiedBundle.extract stages into ".<slot>.<random>.partial" beside the slot.
        found = False
        for staging in self.slots_dir.glob(f".{slot}.*.partial"):
            shutil.rmtree(staging, ignore_errors=True)
            found = True
        return found

    def describe(self) -> dict:
        """The pointer, slot records and journal as one JSON-able document (`edgepack agent status`)."""
        pointer = self.read_pointer()
        slots = {}
        for slot in SLOTS:
            record = self.read_slot_record(slot)
            slots[slot] = None if record is None else record.to_json()
        return {"state_dir": str(self.root), "pointer": pointer.to_json(), "slots": slots,
                "journal": self.read_journal().to_json(), "now": time.time()}


def _read_slot_manifest(slot_dir: Path) -> BundleManifest | None:
    """The manifest of an installed slot (already verified when it was installed), or None if unreadable."""
    try:
        return manifest_from_bytes((slot_dir / "manifest.json").read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, BundleError) as exc:
        log.warning("cannot read the manifest of slot %s: %s", slot_dir.name, exc)
        return None
