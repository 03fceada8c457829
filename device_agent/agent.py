"""The device agent: enrollment, MQTT, and one worker that applies desired states in order.

    agent = Agent(AgentConfig.from_yaml("agent.yaml"))
    agent.run_forever()            # start(), wait for SIGTERM/SIGINT, stop()

Threads: paho's network thread delivers desired states to `_on_desired`, which only decides whether
the message is new and hands it to the worker; the worker runs one install/rollback at a time. A
newer seq replaces a queued older one (the fleet changed its mind before the device got to it); a seq
at or below the last one finished, queued or in flight is ignored, so duplicates and the retained
replay after every reconnect do nothing.

What the device reports (retained, QoS 1, on `edgepack/v1/devices/{id}/status`): every phase of the
current desired state with its seq and rollout id, the active and previous bundle ids, and the error
of a failure. The last will publishes the same status with `state: offline`. When a download gives
up on the network the phase stays `downloading` with the error, and the same desired state is tried
again `download.retry_interval_s` later (and on restart); every other failure is final for its seq.

Extension points for inference, telemetry and shadow mode (issue 5): `on_active_change(callback)`
fires after every switch with the new `ActiveBundle`; `register_action("shadow", handler)` plugs an
action in; `publish(topic, payload)` sends on the agent's connection.

Inference: `agent.engine` (device_agent.inference.InferenceEngine) serves the active bundle and is
swapped on every switch before any other listener hears of it; `agent.infer(inputs)` is the Python
API, `agent.engine.add_observer(fn)` sees every request, and with `serve` in the config the same
engine answers HTTP on `serve.host:serve.port` (device_agent.http_server).

Telemetry, shadow mode and local safety watch the engine's requests and the agent's switches:
`agent.telemetry` (device_agent.telemetry) publishes a window every `telemetry.window_s` and buffers
windows on disk while the broker is away; `agent.shadow` (device_agent.shadow) is the `shadow` action;
`agent.safety` (device_agent.safety) rolls back by itself, with `switch_back`, when a newly installed
bundle's error rate jumps, and at start, before any model is loaded, when it crash-loops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from edgepack import __version__
from edgepack.clock import SYSTEM_CLOCK, Clock
from edgepack.errors import ConfigError, EdgepackError, ProtocolError
from edgepack.mqtt import connect_client, redact_url
from edgepack.protocol import DesiredState, DeviceStatus, decode, desired_topic, encode, status_topic

from device_agent.buffer import DiskBuffer
from device_agent.config import AgentConfig
from device_agent.director import DesiredVerifier, PinnedKeyError, downgrade_refusal, load_pinned_key
from device_agent.downloader import Downloader, DownloadSettings
from device_agent.fleet_api import FleetClient, enroll_until_done
from device_agent.http_server import InferenceServer
from device_agent.inference import InferenceEngine
from device_agent.installer import Installer, InstallOutcome, PhaseCallback
from device_agent.safety import SafetyMonitor
from device_agent.shadow import ShadowMode
from device_agent.state import ActiveBundle, AgentState, FaultHook, Journal
from device_agent.telemetry import BUFFER_NAME, TelemetryPublisher

log = logging.getLogger(__name__)

ActionHandler = Callable[[DesiredState, PhaseCallback], InstallOutcome]
ActiveListener = Callable[[ActiveBundle | None], None]


class Agent:
    """One device: its state folder, its fleet credential, its MQTT session and its install worker."""

    def __init__(self, config: AgentConfig, *, fault: FaultHook | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock  # telemetry windows and the safety watch; MQTT, downloads and retries run on real time
        self.device_id = config.device_id
        self.state = AgentState(config.state_dir, config.load_trusted_keys(), fault=fault)
        self.fleet = FleetClient(config.fleet_url, config.device_id, timeout_s=config.download.timeout_s,
                                 ssl_context=config.https_context(),
                                 ca_label=f"CA {config.ca_file}" if config.ca_file else "the system CA store")
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._cond = threading.Condition()
        self._status_lock = threading.RLock()
        self._pending: DesiredState | None = None
        self._not_before = 0.0
        self._in_flight: DesiredState | None = None
        self._journal = Journal()
        self._status: DeviceStatus | None = None
        self._active: ActiveBundle | None = None
        self._listeners: list[ActiveListener] = []
        self._worker: threading.Thread | None = None
        self._client = None
        self._started = False
        self.malformed_messages = 0
        self.ignored_desired = 0
        self.refused_desired = 0  # unsigned, another key or device, expired: refused without acting (director.py)
        self._refused_seq: int | None = None
        self._last_refusal_report = 0.0
        self.verifier = self._verifier()
        self.applied_desired = 0
        downloader = Downloader(self.state.downloads_dir, self.fleet, DownloadSettings(
            chunk_bytes=config.download.chunk_bytes, retries=config.download.retries, backoff_s=config.download.backoff_s,
            max_backoff_s=config.download.max_backoff_s, timeout_s=config.download.timeout_s), should_stop=self._stop.is_set)
        self.installer = Installer(self.state, downloader, profile=config.profile, selftest_timeout_s=config.selftest_timeout_s,
                                   selftest_isolation=config.selftest_isolation)
        self._actions: dict[str, ActionHandler] = {
            "install": self._install,
            "rollback": self._rollback,
            "shadow": self._unsupported,
        }
        # Inference: the engine follows every switch first, so later listeners see it serving the new bundle.
        self.engine = InferenceEngine()
        self.inference_server: InferenceServer | None = None
        self._listeners.insert(0, self._load_active_model)
        # Telemetry, shadow mode and local safety: engine observers and switch listeners (after the engine).
        self._switch_lock = threading.Lock()  # one switch at a time: the worker's desired states, local rollbacks
        self.shadow = ShadowMode(self.installer, self.state.root / "shadow", sample_rate=config.shadow.sample_rate,
                                 max_pending=config.shadow.max_pending)
        self.telemetry = TelemetryPublisher(
            self.device_id, self, DiskBuffer(self.state.root / BUFFER_NAME, config.telemetry.buffer_max_bytes),
            window_s=config.telemetry.window_s, shadow_summary=self.shadow.summary, clock=clock)
        self.safety = SafetyMonitor(self.state.root, config.safety, switch_back=self.switch_back, clock=clock)
        for observer in (self.telemetry.observe, self.safety.observe, self.shadow.observe):
            self.engine.add_observer(observer)
        self._listeners += [self.telemetry.set_active, self.shadow.on_active_change]
        self._actions.update({"install": self.safety.watching(self._install, "install"),
                              "rollback": self.safety.watching(self._rollback, "rollback"),
                              "shadow": self.shadow.handle})

    # -- public API ----------------------------------------------------------------------------------

    def active_bundle(self) -> ActiveBundle | None:
        """The verified bundle the device runs now (None before the first install)."""
        return self._active

    def status(self) -> DeviceStatus | None:
        """The last status this agent published (or would have, while disconnected)."""
        return self._status

    def on_active_change(self, callback: ActiveListener) -> None:
        """Call `callback(active_bundle)` after every switch (install, rollback, recovery at start)."""
        self._listeners.append(callback)

    def register_action(self, action: str, handler: ActionHandler) -> None:
        """Handle desired states with `action` (e.g. "shadow") by `handler(desired, on_phase)`."""
        self._actions[action] = handler

    def infer(self, inputs):
        """The active model's outputs for `inputs` ({input name: array}); InferenceError when it cannot."""
        return self.engine.infer(inputs)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False):
        """Send on the agent's connection; the client's message info (None when there is no client)."""
        client = self._client
        if client is not None:
            return client.publish(topic, payload, qos=qos, retain=retain)
        return None

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def switch_back(self, from_bundle_id: str, reason: str) -> InstallOutcome | None:
        """Roll back to the previous slot (no download) because the device decided to; report `rolled_back`.

        Waits for a desired state being applied to finish; does nothing (None) when `from_bundle_id` is no
        longer active by then. The last desired state keeps its seq, so its retained copy is not replayed.
        """
        with self._switch_lock:
            pointer = self.state.read_pointer()
            if pointer.active is None or pointer.active.bundle_id != from_bundle_id:
                return None
            outcome = self.installer.rollback(None)
            if outcome.switched:
                self._active = self.state.active_bundle()
                self._notify_active()
            self._record_local_outcome(outcome, reason)
            return outcome

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or in flight (retries waiting for their time count as queued)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._in_flight is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def start(self) -> None:
        """Recover the state folder, enroll if needed, connect, and start the worker. Returns quickly."""
        if self._started:
            return
        self._started = True
        report = self.state.recover()
        self._journal = self.state.read_journal()
        self._active = self.state.active_bundle()
        self._roll_back_a_crash_loop()
        credential = self._credential()
        if credential is None:  # stopped while waiting for the fleet
            return
        self.fleet.credential = credential
        initial_error = None
        if any(action.startswith("fell back") or action.startswith("no verified") for action in report.actions):
            initial_error = "recovered at start: " + "; ".join(report.actions)
        phase = self._journal.phase if self._journal.last_seq >= 0 else ("active" if self._active else "idle")
        self._set_status(phase, seq=max(self._journal.last_seq, 0), rollout_id=self._journal.rollout_id,
                         error=initial_error or self._journal.error, send=False)
        self._notify_active()
        self.shadow.resume()
        self._start_serving()
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.device_id}-worker", daemon=True)
        self._worker.start()
        self._connect()
        self.telemetry.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish or abandon the current step, publish `offline`, disconnect."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
        if self.inference_server is not None:
            self.inference_server.stop()
        if self._started:
            self.telemetry.stop()  # its last window goes out (or to the buffer) before the connection closes
            self.shadow.close()
            self.safety.mark_clean_stop()
        client, self._client = self._client, None
        if client is not None:
            with self._status_lock:
                status = (self._status or self._base_status()).model_copy(update={"state": "offline", "ts": time.time()})
            try:
                if self._connected.is_set():
                    info = client.publish(status_topic(self.device_id), encode(status), qos=1, retain=True)
                    info.wait_for_publish(timeout=min(timeout, 2.0))
            except (RuntimeError, ValueError) as exc:
                log.info("offline status not sent: %s", exc)
            client.disconnect()
            client.loop_stop()
        self._connected.clear()

    def run_forever(self) -> int:
        """start(), wait for SIGTERM or SIGINT, stop(); returns the process exit code."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self._stop.set())
        try:
            self.start()
            heartbeat = self.state.root / "agent.heartbeat"
            last_beat = 0.0
            while not self._stop.wait(1.0):
                # The container healthcheck reads this file's age: touch it while the agent loop is alive.
                if time.monotonic() - last_beat >= 15.0:
                    heartbeat.touch()
                    last_beat = time.monotonic()
        finally:
            self.stop()
        return 0

    # -- enrollment ----------------------------------------------------------------------------------

    def _credential(self) -> str | None:
        credential = self.state.read_credential()
        if credential is not None:
            return credential
        token = self.config.enrollment_token
        if not token:
            raise ConfigError(f"device {self.device_id} is not enrolled: no credential in {self.state.root} "
                              "and no enrollment_token in the config", device_id=self.device_id)
        credential = enroll_until_done(self.fleet, profile=self.config.profile, labels=dict(self.config.labels), token=token,
                                       should_stop=self._stop.is_set, backoff_s=max(self.config.download.backoff_s, 0.1),
                                       max_backoff_s=self.config.download.max_backoff_s)
        if credential is not None:
            # The fleet key goes to disk before the credential: a crash in between re-enrolls rather than
            # leaving a device that holds a credential and no key (it would accept unsigned states).
            self._pin_fleet_key(self.fleet.fleet_key)
            self.state.write_credential(credential)
            log.info("device %s enrolled at %s", self.device_id, self.config.fleet_url)
        return credential

    def _pin_fleet_key(self, document: dict | None) -> None:
        if document is None:
            log.warning("the fleet at %s handed out no fleet key: desired states cannot be verified",
                        self.config.fleet_url)
            return
        try:
            load_pinned_key(document)
        except PinnedKeyError as exc:
            raise ConfigError(f"enrollment at {self.config.fleet_url}: {exc}", device_id=self.device_id) from None
        self.state.write_fleet_key(document)
        self.verifier = self._verifier()
        log.info("pinned fleet key %s", self.verifier.key_id)

    def _verifier(self) -> DesiredVerifier:
        try:
            return DesiredVerifier(self.device_id, self.state.read_fleet_key(),
                                   require_signed=self.config.require_signed_desired,
                                   max_age_s=self.config.desired_max_age_s)
        except PinnedKeyError as exc:
            raise ConfigError(f"pinned fleet key in {self.state.root}: {exc}", device_id=self.device_id) from None

    # -- MQTT ----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        import paho.mqtt.client as mqtt

        # mqtt_url plus ca_file and the client certificate: with mqtts:// the broker is verified (host name
        # included) and an untrusted one is a ConfigError line here, not an endless silent reconnect.
        # The device's MQTT identity is its id and its fleet credential (one secret for both planes, so a
        # revocation or rotation acts on both); a user:password@ in mqtt_url wins (a broker managed by hand).
        endpoint = self.config.mqtt_endpoint()
        if not endpoint.username and self.fleet.credential:
            endpoint = self.config.mqtt_endpoint(username=self.device_id, password=self.fleet.credential)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=endpoint.client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        offline = (self._status or self._base_status()).model_copy(update={"state": "offline"})
        client.will_set(status_topic(self.device_id), encode(offline), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        connect_client(client, endpoint, keepalive_s=self.config.mqtt_keepalive_s)
        client.loop_start()
        self._client = client
        if self._stop.is_set():
            # stop() ran in another thread while this connected: it found no client to close, so close it here
            # (stop sets the flag before it reads _client, and this sets _client before it reads the flag).
            self._client = None
            client.disconnect()
            client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the connection: %s", reason_code)
            return
        self._connected.set()
        client.subscribe(desired_topic(self.device_id), qos=1)
        with self._status_lock:
            status = self._status or self._base_status()
            client.publish(status_topic(self.device_id), encode(status.model_copy(update={"state": "online", "ts": time.time()})),
                           qos=1, retain=True)
        log.info("connected to %s as %s", redact_url(self.config.mqtt_url), self.device_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.info("MQTT connection lost (%s); reconnecting", reason_code)
            # The will is fixed per connection: give the next one the bundles as they are now.
            with self._status_lock:
                status = self._status or self._base_status()
            client.will_set(status_topic(self.device_id), encode(status.model_copy(update={"state": "offline"})),
                            qos=1, retain=True)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != desired_topic(self.device_id):
            return
        if not message.payload:
            return  # the fleet cleared the retained desired state: nothing to do
        try:
            desired = decode(DesiredState, message.payload)
        except ProtocolError as exc:
            self.malformed_messages += 1
            log.warning("ignored a malformed desired state (%d so far): %s", self.malformed_messages, exc)
            return
        self._on_desired(desired)

    # -- desired states ------------------------------------------------------------------------------

    def submit(self, desired: DesiredState) -> bool:
        """Queue a desired state as if it came over MQTT; False when it is not newer than what we have."""
        return self._on_desired(desired)

    def _on_desired(self, desired: DesiredState) -> bool:
        keys_changed, queued, refusal = False, False, None
        with self._cond:
            floor = self._journal.last_seq
            for known in (self._pending, self._in_flight):
                if known is not None:
                    floor = max(floor, known.seq)
            if desired.seq <= floor:
                self.ignored_desired += 1
                log.debug("ignored desired seq %d (have %d)", desired.seq, floor)
                # Not checked further: the retained copy of a state already finished may have expired since,
                # and ignoring it is enough. But a finished state re-signed during a fleet key rotation carries
                # the next key: pin it, act on nothing.
                if desired.next_key is not None and self.verifier.check(desired) is None:
                    keys_changed = self.verifier.learn(desired)
            else:
                # A refused state leaves the floor where it was.
                refusal = self.verifier.check(desired)
                if refusal is None:
                    keys_changed = self.verifier.accepted(desired)
                    if self._pending is not None:
                        log.info("desired seq %d supersedes queued seq %d", desired.seq, self._pending.seq)
                    self._pending = desired
                    self._not_before = 0.0
                    self._cond.notify_all()
                    queued = True
        if keys_changed:
            self._save_fleet_keys()
        if refusal is not None:
            self._refuse_desired(desired, refusal)  # outside the lock: it publishes
        return queued

    def _save_fleet_keys(self) -> None:
        """Write the pinned keys down and tell the fleet (`fleet_keys` in the status: how it sees a rotation reach)."""
        document = self.verifier.pinned_document()
        if document is None:
            return
        self.state.write_fleet_key(document)
        with self._status_lock:
            current = self._status
        if current is not None:
            self._set_status(current.phase, seq=current.seq, rollout_id=current.rollout_id, error=current.error)

    def _refuse_desired(self, desired: DesiredState, reason: str) -> None:
        """Report a refused desired state (error and refused_seq) without acting on it or moving the seq."""
        self.refused_desired += 1
        log.warning("%s (%d refused so far)", reason, self.refused_desired)
        self._refused_seq = desired.seq
        now = time.monotonic()
        if now - self._last_refusal_report < 1.0:
            return  # a flood of forgeries gets one report a second; the counter has them all
        self._last_refusal_report = now
        with self._status_lock:
            current = self._status or self._base_status()
        self._set_status(current.phase, seq=current.seq, rollout_id=current.rollout_id, error=reason)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop.is_set():
                    wait = self._not_before - time.monotonic()
                    if self._pending is not None and wait <= 0:
                        break
                    self._cond.wait(wait if self._pending is not None else None)
                if self._stop.is_set():
                    return
                desired, self._pending = self._pending, None
                self._in_flight = desired
            try:
                with self._switch_lock:
                    self._apply(desired)
            except Exception:  # a bug must not kill the worker; the seq stays unfinished and is retried on restart
                log.exception("unexpected error applying desired seq %d", desired.seq)
                self._set_status("failed", seq=desired.seq, rollout_id=desired.rollout_id, error="agent error (see its log)")
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()

    def _apply(self, desired: DesiredState) -> None:
        handler = self._actions.get(desired.action, self._unsupported)

        def on_phase(phase: str) -> None:
            self._set_status(phase, seq=desired.seq, rollout_id=desired.rollout_id)

        log.info("applying desired seq %d: %s %s", desired.seq, desired.action,
                 f"{desired.bundle.name} {desired.bundle.version}" if desired.bundle else "")
        self.shadow.before_desired(desired)
        outcome = handler(desired, on_phase)
        if outcome.switched:
            self._active = self.state.active_bundle()
            self._notify_active()
        if outcome.retryable and not self._stop.is_set():
            interval = self.config.download.retry_interval_s
            self._set_status("downloading", seq=desired.seq, rollout_id=desired.rollout_id,
                             error=f"{outcome.error}; retrying in {interval:g} s")
            with self._cond:
                if self._pending is None:
                    self._pending = desired
                    self._not_before = time.monotonic() + interval
            return
        if outcome.retryable:
            return  # stopping: the retained desired state brings it back after the restart
        journal = Journal(last_seq=desired.seq, rollout_id=desired.rollout_id, phase=outcome.phase, error=outcome.error,
                          bundle_id=outcome.current_bundle, updated_at=time.time())
        self.state.write_journal(journal)
        with self._cond:
            self._journal = journal
        self.applied_desired += 1
        self._set_status(outcome.phase, seq=desired.seq, rollout_id=desired.rollout_id, error=outcome.error)

    def _install(self, desired: DesiredState, on_phase: PhaseCallback) -> InstallOutcome:
        if desired.bundle is None:
            return self._refuse("desired state 'install' names no bundle")
        active = self.state.active_bundle()
        downgrade = downgrade_refusal(desired, active.name if active else None, active.version if active else None)
        if downgrade is not None:
            log.warning("desired seq %d: %s", desired.seq, downgrade)
            return self._refuse(downgrade)
        return self.installer.install(desired.bundle, on_phase)

    def _rollback(self, desired: DesiredState, on_phase: PhaseCallback) -> InstallOutcome:
        return self.installer.rollback(desired.bundle, on_phase)

    def _unsupported(self, desired: DesiredState, on_phase: PhaseCallback) -> InstallOutcome:
        return self._refuse(f"action {desired.action!r} is not supported by this agent ({__version__})")

    # -- local safety --------------------------------------------------------------------------------

    def _roll_back_a_crash_loop(self) -> None:
        """At start, before any model is loaded: roll back when the active bundle keeps crashing the agent."""
        pointer = self.state.read_pointer()
        active = self._active
        reason = self.safety.check_at_start(pointer.active.bundle_id if pointer.active else None,
                                            pointer.previous.bundle_id if pointer.previous else None,
                                            active_installed_at=active.record.installed_at if active else None)
        if reason is None or pointer.active is None:
            return
        log.warning("%s", reason)
        outcome = self.installer.rollback(None)
        self.safety.after_start_rollback(outcome, pointer.active.bundle_id, reason)
        if outcome.switched:
            self._active = self.state.active_bundle()
        self._record_local_outcome(outcome, reason, send=False)

    def _record_local_outcome(self, outcome: InstallOutcome, reason: str, *, send: bool = True) -> None:
        """A rollback the device made by itself: journal and status under the last desired state's seq."""
        error = reason if outcome.switched else f"{reason}; the rollback failed: {outcome.error}"
        journal = Journal(last_seq=self._journal.last_seq, rollout_id=self._journal.rollout_id,
                          phase="rolled_back" if outcome.switched else self._journal.phase, error=error,
                          bundle_id=outcome.current_bundle, updated_at=time.time())
        self.state.write_journal(journal)
        with self._cond:
            self._journal = journal
        if send:
            self._set_status(journal.phase, seq=max(journal.last_seq, 0), rollout_id=journal.rollout_id, error=error)

    def _refuse(self, error: str) -> InstallOutcome:
        pointer = self.state.read_pointer()
        return InstallOutcome(phase="failed", error=error,
                              current_bundle=pointer.active.bundle_id if pointer.active else None,
                              previous_bundle=pointer.previous.bundle_id if pointer.previous else None)

    # -- status --------------------------------------------------------------------------------------

    def _base_status(self) -> DeviceStatus:
        pointer = self.state.read_pointer()
        return DeviceStatus(device_id=self.device_id, profile=self.config.profile, agent_version=__version__,
                            current_bundle=pointer.active.bundle_id if pointer.active else None,
                            previous_bundle=pointer.previous.bundle_id if pointer.previous else None,
                            shadow_bundle=self.shadow.bundle_id, fleet_keys=self.verifier.key_ids() or None,
                            ts=time.time())

    def _set_status(self, phase: str, *, seq: int, rollout_id: str | None, error: str | None = None, send: bool = True) -> None:
        with self._status_lock:
            status = self._base_status().model_copy(update={"phase": phase, "seq": seq, "rollout_id": rollout_id, "error": error,
                                                            "refused_seq": self._refused_seq})
            self._status = status
            payload = encode(status)
            client = self._client
            if send and client is not None:
                client.publish(status_topic(self.device_id), payload, qos=1, retain=True)
        if send and self.config.report_status_over_http:
            self.fleet.post_status(payload)

    # -- inference ---------------------------------------------------------------------------------

    def _load_active_model(self, active: ActiveBundle | None) -> None:
        if active is None:
            self.engine.clear()
        elif active.bundle_id != self.engine.active_bundle_id:
            try:
                self.engine.swap(active.path, active.manifest, bundle_id=active.bundle_id)
            except EdgepackError as exc:  # self-tested, so rare; the engine keeps answering with what it had
                log.error("cannot serve bundle %s: %s (still serving %s)", active.bundle_id[:12], exc.message,
                          (self.engine.active_bundle_id or "nothing")[:12])

    def _start_serving(self) -> None:
        serve = self.config.serve
        if serve is None or not serve.enabled or self.inference_server is not None:
            return
        server = InferenceServer(self.engine, host=serve.host, port=serve.port, max_body_bytes=serve.max_body_bytes)
        try:
            server.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve inference on {serve.host}:{serve.port}: {exc.strerror or exc}",
                              field="serve") from None
        self.inference_server = server

    def _notify_active(self) -> None:
        for callback in list(self._listeners):
            try:
                callback(self._active)
            except Exception:  # a listener's bug must not stop installs; it is logged with its traceback
                log.exception("active-bundle listener failed")


def run_agent(config: AgentConfig) -> int:
    """Entry point of `edgepack agent run`: run until SIGTERM/SIGINT."""
    return Agent(config).run_forever()
