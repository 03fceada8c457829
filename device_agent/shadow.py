"""Shadow mode: run a candidate bundle beside the active one on a sample of live requests, never answering with it.

A desired state `{"action": "shadow", "bundle": …}` makes the agent

    downloading → verifying → installing → selftest → active      (status `shadow_bundle` = the candidate)

with the candidate unpacked into `state_dir/shadow/bundle/` (never a slot: the A/B pointer does not
move) and loaded through `device_agent.runtimes`. From then on, each answered request of the active
bundle is picked with probability `shadow.sample_rate`; for a picked one the engine observer copies the
inputs and the active model's compared output and puts them on a bounded queue (full queue: the
sample is dropped and counted) — that is all the request's thread pays. One background worker runs the
candidate on those inputs and compares. Requests are always answered by the active model.

Per telemetry window the `shadow` field carries

    samples            requests the candidate ran on
    agreement          top-1 agreement with the active model: argmax over the last axis of the compared
                       output (the active model's first output, by name in the candidate, else by
                       position), averaged over its rows; an output whose last axis has one element is
                       compared as a number (|a − c| ≤ 1e-3 + 1e-2·|a|)
    mean_abs_diff      mean |active − candidate| of the compared output
    candidate_p50_ms   the candidate's run time (p50, p95) on the sampled inputs, measured in the worker
    candidate_p95_ms
    active_p50_ms      the active model's latency on the same requests (as the engine measured it)
    candidate_errors   runs of the candidate that raised
    dropped            samples dropped because the worker was behind

(`agreement` and the latencies only when `samples` > 0.) Both models run on the same device at the
same time, so the latencies compare like with like but are not what the candidate would do alone.

A shadow ends when another desired state is applied (install, rollback, or a shadow of another
bundle), when the candidate becomes the active bundle, or with a `shadow` desired state without a
bundle. It survives an agent restart: `state_dir/shadow/shadow.json` names the candidate, whose folder
is re-verified against the trusted keys before it is loaded again. The downloaded candidate stays in
the downloads folder while shadowing, so installing it afterwards needs no second download.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.bundle import manifest_from_bytes
from edgepack.errors import EdgepackError
from edgepack.protocol import BundleRef, DesiredState

from device_agent.installer import Installer, InstallOutcome, PhaseCallback
from device_agent.runtimes import adapter_for
from device_agent.state import fsync_dir, verify_slot_dir, write_atomic
from device_agent.telemetry import LatencyHistogram

if TYPE_CHECKING:
    from device_agent.inference import InferenceEvent
    from device_agent.state import ActiveBundle

log = logging.getLogger(__name__)

RECORD_NAME = "shadow.json"
BUNDLE_DIR = "bundle"


@dataclass
class _Sample:
    inputs: dict[str, np.ndarray]
    active_output: np.ndarray
    output_name: str
    active_latency_ms: float


@dataclass
class _Candidate:
    bundle_id: str
    session: Any  # device_agent.runtimes.ModelSession
    output_names: tuple[str, ...]


class _WindowStats:
    def __init__(self) -> None:
        self.samples = 0
        self.agreement_sum = 0.0
        self.abs_diff_sum = 0.0
        self.candidate_errors = 0
        self.dropped = 0
        self.candidate = LatencyHistogram()
        self.active = LatencyHistogram()


def top1_agreement(active: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose argmax over the last axis agrees (numbers: agree within tolerance)."""
    a = np.asarray(active, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if a.size != c.size:
        return 0.0
    c = c.reshape(a.shape)
    if a.ndim == 0 or a.shape[-1] == 1:
        return float(np.mean(np.abs(a - c) <= 1e-3 + 1e-2 * np.abs(a)))
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(c, axis=-1)))


class ShadowMode:
    """The `shadow` action and the candidate that runs beside the active bundle. Thread-safe."""

    def __init__(self, installer: Installer, shadow_dir: Path, *, sample_rate: float = 0.1, max_pending: int = 64,
                 seed: int | None = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("sample_rate must be within [0, 1]")
        self.installer = installer
        self.shadow_dir = Path(shadow_dir)
        self.sample_rate = float(sample_rate)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._candidate: _Candidate | None = None
        self._active_bundle_id: str | None = None
        self._queue: queue.Queue[_Sample | None] = queue.Queue(maxsize=max_pending)
        self._stats = _WindowStats()
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def bundle_id(self) -> str | None:
        """The candidate being shadowed (None when shadow mode is off)."""
        candidate = self._candidate
        return candidate.bundle_id if candidate is not None else None

    @property
    def bundle_dir(self) -> Path:
        return self.shadow_dir / BUNDLE_DIR

    # -- the action ----------------------------------------------------------------------------------

    def handle(self, desired: DesiredState, on_phase: PhaseCallback) -> InstallOutcome:
        """Apply a `shadow` desired state: stage and load its bundle, or end shadowing when it names none."""
        ref = desired.bundle
        if ref is None:
            self.stop("the fleet ended shadow mode")
            return self._outcome("active")
        pointer = self.installer.state.read_pointer()
        if pointer.active is None:
            return self._outcome("failed", "shadow mode needs an active bundle to compare with; none is installed")
        if pointer.active.bundle_id == ref.id:
            self.stop("the candidate is the active bundle")
            return self._outcome("failed", f"bundle {ref.id[:12]} is already active; nothing to shadow")
        if self.bundle_id == ref.id:
            return self._outcome("active")
        self.stop(f"replaced by candidate {ref.id[:12]}")
        outcome = self.installer.stage(ref, self.bundle_dir, on_phase)
        if outcome.phase != "active":
            return outcome
        try:
            candidate = self._load(ref.id)
        except EdgepackError as exc:
            self._forget()
            return self._outcome("failed", f"cannot load the shadow candidate: {exc.message}", downloaded=True)
        self._write_record(ref, desired)
        self._begin(candidate)
        log.info("shadowing %s %s (%s) beside %s at a sample rate of %g", ref.name, ref.version, ref.id[:12],
                 pointer.active.bundle_id[:12], self.sample_rate)
        return outcome

    def resume(self) -> bool:
        """At agent start: shadow again the candidate named in the state folder, if it still verifies."""
        record = self._read_record()
        for staging in self.shadow_dir.glob(f".{BUNDLE_DIR}.*.partial") if self.shadow_dir.is_dir() else ():
            shutil.rmtree(staging, ignore_errors=True)
        if record is None:
            return False
        bundle_id = str(record.get("bundle_id", ""))
        if bundle_id == self._active_bundle_id:
            log.info("shadow candidate %s is the active bundle now; shadow mode is off", bundle_id[:12])
            self._forget(keep_download=False, bundle_id=bundle_id)
            return False
        try:
            verify_slot_dir(self.bundle_dir, self.installer.state.trusted_keys)
            candidate = self._load(bundle_id)
        except (EdgepackError, OSError) as exc:
            log.warning("shadow candidate %s cannot be resumed (%s); shadow mode is off", bundle_id[:12], exc)
            self._forget()
            return False
        self._begin(candidate)
        log.info("resumed shadowing %s", bundle_id[:12])
        return True

    def stop(self, reason: str, *, keep_download: bool = False) -> None:
        """End shadow mode (if on): unload the candidate and remove it from the state folder."""
        with self._lock:
            candidate, self._candidate = self._candidate, None
        if candidate is None:
            return
        log.info("shadow mode of %s ended: %s", candidate.bundle_id[:12], reason)
        self._drain_queue()
        self._forget(keep_download=keep_download, bundle_id=candidate.bundle_id)
        try:
            candidate.session.close()
        except Exception:  # closing must not disturb the agent
            log.exception("closing the shadow candidate failed")

    def close(self) -> None:
        """Stop the worker and unload (the candidate stays on disk, to be resumed at the next start)."""
        self._closed = True
        with self._lock:
            candidate, self._candidate = self._candidate, None
        self._drain_queue()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._worker is not None:
            self._worker.join(5.0)
            self._worker = None
        if candidate is not None:
            candidate.session.close()

    # -- listeners -----------------------------------------------------------------------------------

    def before_desired(self, desired: DesiredState) -> None:
        """Another desired state is about to be applied: it replaces the shadow."""
        if desired.action != "shadow":
            # Installing the candidate itself reuses its download.
            promoted = desired.bundle is not None and desired.bundle.id == self.bundle_id
            self.stop(f"desired seq {desired.seq} ({desired.action}) replaces it", keep_download=promoted)

    def on_active_change(self, active: "ActiveBundle | None") -> None:
        """An active-bundle listener: a candidate that became the active bundle has nothing left to shadow."""
        self._active_bundle_id = active.bundle_id if active is not None else None
        if active is not None and active.bundle_id == self.bundle_id:
            self.stop("the candidate became the active bundle")

    def observe(self, event: "InferenceEvent") -> None:
        """An engine observer: pick a sample of answered requests for the candidate."""
        candidate = self._candidate
        if candidate is None or event.outputs is None or event.bundle_id == candidate.bundle_id:
            return
        if self._random.random() >= self.sample_rate:
            return
        if not event.outputs:
            return
        output_name = next(iter(event.outputs))
        sample = _Sample(inputs={name: np.array(value, copy=True) for name, value in event.inputs.items()},
                         active_output=np.array(event.outputs[output_name], copy=True), output_name=output_name,
                         active_latency_ms=event.latency_ms)
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            with self._lock:
                self._stats.dropped += 1

    def summary(self, reset: bool = True) -> dict[str, float] | None:
        """This window's comparison (the telemetry `shadow` field); None when shadow mode is off."""
        with self._lock:
            stats = self._stats
            if reset:
                self._stats = _WindowStats()
            on = self._candidate is not None
        if not on and stats.samples == 0 and stats.candidate_errors == 0:
            return None
        result: dict[str, float] = {"samples": float(stats.samples), "candidate_errors": float(stats.candidate_errors),
                                    "dropped": float(stats.dropped)}
        if stats.samples:
            result["agreement"] = round(stats.agreement_sum / stats.samples, 6)
            result["mean_abs_diff"] = round(stats.abs_diff_sum / stats.samples, 6)
            for key, histogram, q in (("candidate_p50_ms", stats.candidate, 0.50), ("candidate_p95_ms", stats.candidate, 0.95),
                                      ("active_p50_ms", stats.active, 0.50)):
                value = histogram.percentile(q)
                if value is not None:
                    result[key] = round(value, 4)
        return result

    # -- the worker ----------------------------------------------------------------------------------

    def _begin(self, candidate: _Candidate) -> None:
        with self._lock:
            self._candidate = candidate
            self._stats = _WindowStats()
        if self._worker is None and not self._closed:
            self._worker = threading.Thread(target=self._work, name="shadow-worker", daemon=True)
            self._worker.start()

    def wait_idle(self, timeout: float) -> bool:
        """True once every queued sample has been compared (tests, and a clean shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _work(self) -> None:
        while True:
            sample = self._queue.get()
            try:
                if sample is None:
                    return
                candidate = self._candidate
                if candidate is not None:
                    self._compare(candidate, sample)
            finally:
                self._queue.task_done()

    def _compare(self, candidate: _Candidate, sample: _Sample) -> None:
        started = time.perf_counter()
        try:
            outputs = candidate.session.run(sample.inputs)
        except Exception as exc:  # the candidate's own failure is data for the fleet, not an agent error
            with self._lock:
                if self._candidate is candidate:
                    self._stats.candidate_errors += 1
            log.debug("shadow candidate %s failed: %s", candidate.bundle_id[:12], exc)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        compared = outputs.get(sample.output_name)
        if compared is None and outputs:
            compared = next(iter(outputs.values()))  # named differently: compare by position (the first)
        if compared is None:
            agreement, diff = 0.0, float("nan")
        else:
            agreement = top1_agreement(sample.active_output, compared)
            a = np.asarray(sample.active_output, dtype=np.float64)
            c = np.asarray(compared, dtype=np.float64)
            diff = float(np.mean(np.abs(a - c.reshape(a.shape)))) if a.size == c.size and a.size else float("nan")
        with self._lock:
            if self._candidate is not candidate:
                return
            stats = self._stats
            stats.samples += 1
            stats.agreement_sum += agreement
            stats.abs_diff_sum += diff if np.isfinite(diff) else 0.0
            stats.candidate.add(elapsed_ms)
            stats.active.add(sample.active_latency_ms)

    def _drain_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._queue.task_done()

    # -- the state folder ----------------------------------------------------------------------------

    def _outcome(self, phase: str, error: str | None = None, **facts: Any) -> InstallOutcome:
        if error is not None:
            log.warning("shadow mode: %s", error)
        pointer = self.installer.state.read_pointer()
        return InstallOutcome(phase=phase, error=error,  # type: ignore[arg-type]
                              current_bundle=pointer.active.bundle_id if pointer.active else None,
                              previous_bundle=pointer.previous.bundle_id if pointer.previous else None, **facts)

    def _load(self, bundle_id: str) -> _Candidate:
        manifest = manifest_from_bytes((self.bundle_dir / "manifest.json").read_bytes())  # verified when it was staged
        session = adapter_for(manifest.runtime).load(self.bundle_dir, manifest)
        return _Candidate(bundle_id=bundle_id, session=session, output_names=tuple(session.output_names))

    def _write_record(self, ref: BundleRef, desired: DesiredState) -> None:
        document = {"schema_version": 1, "bundle_id": ref.id, "name": ref.name, "version": ref.version,
                    "seq": desired.seq, "rollout_id": desired.rollout_id, "started_at": time.time()}
        write_atomic(self.shadow_dir / RECORD_NAME, json.dumps(document, sort_keys=True).encode() + b"\n")

    def _read_record(self) -> dict | None:
        try:
            document = json.loads((self.shadow_dir / RECORD_NAME).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("%s is damaged; shadow mode is off", self.shadow_dir / RECORD_NAME)
            return None
        return document if isinstance(document, dict) and isinstance(document.get("bundle_id"), str) else None

    def _forget(self, *, keep_download: bool = True, bundle_id: str | None = None) -> None:
        """Remove the record first (so a crash never resumes a half-removed candidate), then the files."""
        (self.shadow_dir / RECORD_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.bundle_dir, ignore_errors=True)
        if self.shadow_dir.is_dir():
            fsync_dir(self.shadow_dir)
        if not keep_download and bundle_id is not None:
            self.installer.state.download_path(bundle_id).unlink(missing_ok=True)

