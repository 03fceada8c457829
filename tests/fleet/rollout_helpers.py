"""Setup for rollout, gate and bridge tests: a real SQLite database in tmp_path, stored bundles and
enrolled devices, and the two seams the rollout engine owns — a clock and a publisher that records."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgepack.protocol import DesiredState, DeviceStatus, Telemetry
from fleet.db import make_engine, make_session_factory
from fleet.models import Base, Bundle, Device
from fleet.services.status import apply_status, record_telemetry

T0 = 1_700_000_000.0


def session_factory_at(tmp_path: Path) -> sessionmaker[Session]:
    """A session factory on `tmp_path/fleet.db`, tables created (calling it again opens the same database,
    as a restarted server would)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    Base.metadata.create_all(engine)
    return make_session_factory(engine)


def add_bundle(session: Session, name: str, version: str, profile: str) -> Bundle:
    bundle_id = hashlib.sha256(f"{name}-{version}-{profile}".encode()).hexdigest()
    bundle = Bundle(id=bundle_id, name=name, version=version, profile=profile, runtime="onnxruntime",
                    precision="int8", size_bytes=1234, key_id="test-key", manifest={"name": name, "version": version},
                    uploaded_by="test")
    session.add(bundle)
    session.commit()
    return bundle


def add_device(session: Session, device_id: str, profile: str, labels: dict | None = None,
               current_bundle: str | None = None) -> Device:
    device = Device(id=device_id, profile=profile, labels=labels or {}, credential_hash=secrets.token_hex(32),
                    current_bundle_id=current_bundle, online=True)
    session.add(device)
    session.commit()
    return device


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingPublisher:
    """Records every desired state it is asked to publish; `down` makes it refuse, as a broker outage would."""

    messages: list[tuple[str, DesiredState]] = field(default_factory=list)
    down: bool = False

    def publish_desired(self, device_id: str, desired: DesiredState) -> bool:
        if self.down:
            return False
        self.messages.append((device_id, desired))
        return True

    def latest(self) -> dict[str, DesiredState]:
        return {device_id: desired for device_id, desired in self.messages}

    def for_device(self, device_id: str) -> list[DesiredState]:
        return [desired for d, desired in self.messages if d == device_id]


class SimulatedDevices:
    """Devices that answer the desired states a publisher recorded, through the real status service.

    `fail` maps a device id to True for devices whose install of a new bundle fails (they stay on their
    bundle and report `failed`); `silent` devices never answer.
    """

    def __init__(self, session_factory: sessionmaker[Session], publisher: RecordingPublisher, clock: FakeClock) -> None:
        self.session_factory = session_factory
        self.publisher = publisher
        self.clock = clock
        self.fail: set[str] = set()
        self.silent: set[str] = set()
        self.answered: dict[str, int] = {}

    def answer(self) -> int:
        answered = 0
        for device_id, desired in self.publisher.latest().items():
            if device_id in self.silent or self.answered.get(device_id) == desired.seq:
                continue
            with self.session_factory() as session:
                device = session.get(Device, device_id)
                current, previous = device.current_bundle_id, device.previous_bundle_id
                if desired.action == "install" and device_id in self.fail:
                    phase, error = "failed", "self-test failed"
                elif desired.action == "install":
                    phase, error, previous, current = "active", None, current, desired.bundle.id
                else:  # rollback: back to the bundle named (or keep the current one when none is)
                    target = desired.bundle.id if desired.bundle else current
                    phase, error = "active", None
                    if target != current:
                        previous, current = current, target
                apply_status(session, DeviceStatus(device_id=device_id, seq=desired.seq, rollout_id=desired.rollout_id,
                                                   phase=phase, current_bundle=current, previous_bundle=previous,
                                                   error=error, ts=self.clock()), now=self.clock())
            self.answered[device_id] = desired.seq
            answered += 1
        return answered

    def report_telemetry(self, device_id: str, bundle_id: str, p95_ms: float, inferences: int = 200, errors: int = 0,
                         drift: dict | None = None) -> None:
        with self.session_factory() as session:
            record_telemetry(session, Telemetry(device_id=device_id, window_id=uuid.uuid4().hex, bundle_id=bundle_id,
                                                window_s=10, inferences=inferences,
                                                errors=errors, latency_ms={"p50": p95_ms / 2, "p95": p95_ms, "p99": p95_ms * 1.2},
                                                drift=drift or {}), now=self.clock())


def devices_by_id(session: Session) -> dict[str, Device]:
    return {device.id: device for device in session.scalars(select(Device))}


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
