"""The simulated fleet: N real agents, a real broker and a real fleet server, driven by a scenario.

A scenario (`testbeds/scenarios/*.yaml`) names the devices and their profiles, the workload, the rollout
to attempt and the faults to inject. Every device is a real `device_agent.Agent` with its own MQTT
connection, state folder, downloads, installs and inference (the digits model; sessions are loaded per
agent), fed by a workload generator. Device speed is simulated by the inference engine's device clock
(its explicit test seam `simulated_latency_ms`): each answered request reports the host's real wall time
plus the profile's `DEVICE_LATENCY_MS` times a fault's factor times a lognormal jitter exp(N(0, σ)),
σ = `workload.latency_jitter`, drawn from a generator per device seeded by its id (reproducible). Nothing
sleeps: a sleeping thread wakes when sixty or five hundred agents' threads let it, which added 30-160 ms
to every request at 60 devices and squeezed a 1.5x regression to 1.2x (or 0.97x).

Host budget. The workload sends at most `workload.max_total_rate_hz` requests per second in all (default
HOST_BUDGET_HZ): each device sends min(rate_hz, max_total_rate_hz / devices) per second, in-process agents
and worker processes alike, spread evenly over time; the timeline says when the rate was lowered.

Fidelity, and the refusal to judge. The real part of a reported latency (the host's inference, and the
scheduling delay of a busy host) is not the board's, and it dilutes every latency ratio. The simulator
measures it per profile (reported latency minus the simulated part, over every answered request) and
the workload's achieved request rate against its plan, and holds itself to this tolerance: it is
faithful when, for every profile, the p95 of the real part is at most 10 % of that profile's simulated
base latency (REAL_PART_TOLERANCE: a ratio of simulated latencies, (F·S + r)/(S + r'), then lies within
10 % of F) and the workload achieved at least 80 % of its planned rate (RATE_TOLERANCE). A profile that
answered fewer than P95_MIN_REQUESTS requests (the low-traffic scenario: about 26) is judged on its p50:
the p95 of so few is one request, and one request that met a bundle being installed beside it is no
saturated host (a busy host slows most requests, and starves the rate). A run outside it
is `saturated` (`result["fidelity"]` says which part failed): its verdict is no judgement of the release,
`expectation_met` is False and `edgepack testbed run` exits 3.

Faults: `latency` (a profile answers slower with the candidate), `broken_selftest` (the candidate fails
its self-test on devices), `input_drift` (live inputs shift away from the reference), `broker_restart`
(the broker drops every connection periodically) and `offline` (a fraction of devices goes away and
comes back).

The secure path is the default, as production runs it: Mosquitto with the dynamic security plugin and no
anonymous clients, the fleet managing device identities (--mqtt-dynsec), every agent logging in with its
credential and requiring signed desired states. `--tls` adds a lab CA: mqtts:// for agents and fleet, HTTPS
for the API. (benchmarks/bench_rollout.py measures what security costs against an anonymous broker.)

    edgepack testbed run latency-regression --devices 20 [--tls] [--json]
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgepack.errors import ConfigError
from testbeds.fleet_harness import TopicListener, wait_for

SCENARIOS_DIR = Path(__file__).parent / "scenarios"
# Simulated per-request compute time on each board (ms), added to the host's real inference time by the
# engine's device clock; a profile not listed gets UNKNOWN_DEVICE_LATENCY_MS.
DEVICE_LATENCY_MS = {"rpi5": 60.0, "rpi4": 90.0, "x86-avx2": 40.0, "x86-avx512-vnni": 35.0, "jetson-orin-nano": 40.0,
                     "jetson-nano": 70.0, "coral-devboard": 50.0, "intel-nuc": 40.0}
UNKNOWN_DEVICE_LATENCY_MS = 3.0
FINAL = ("succeeded", "rolled_back", "aborted", "failed")
# Where the simulator stops waiting for a rollout: a final status, or paused by the controller (a wave
# stayed inconclusive past its maximum bake; nothing changes until a person acts, and none will here).
ENDED = (*FINAL, "paused")
# paho-mqtt waits on its sockets with select(), which takes descriptors below 1024 only: with ~3 per
# client, one process holds about 300 agents. Larger fleets run the rest in worker processes.
AGENTS_PER_PROCESS = 250
# Requests per second the whole workload may send by default (see the module docstring). Measured on the
# 2-core development host, shared with other work: the cost grows with requests, not devices (a request
# takes ~0.5 ms of the process's CPU, and each onnxruntime session's intra-op pool spins ~1.5 ms after
# every run), and 600 req/s kept 60 devices faithful (real part p95 1.6 / 2.4 ms) while the simulator
# alone took 1.45 of the 2 cores; at 400, 20 and 200 devices stayed faithful too (p95 at most 2.5 ms,
# 6 % of x86-avx2's 40 ms), with a third of a core more left for 500 agents, their broker and the fleet.
HOST_BUDGET_HZ = 400.0
# Threads per process that send the workload's requests: one per core. Nothing waits in a request (the
# device clock does not sleep) and the digits model runs in a fraction of a millisecond, so two keep up
# with the host budget; more only put more requests in flight whenever the process stalls, and each of
# them carries the stall in its real part.
WORKLOAD_THREADS = 2
# The fidelity tolerance (see the module docstring): the real part's p95 at most this share of the
# profile's simulated latency, the achieved request rate at least this share of the plan.
REAL_PART_TOLERANCE = 0.10
RATE_TOLERANCE = 0.80
P95_MIN_REQUESTS = 100  # below it a profile's real part is judged on its p50 (see the module docstring)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSpec(_Strict):
    count: int = Field(default=20, gt=0)
    profiles: list[str] = Field(min_length=1)


class WorkloadSpec(_Strict):
    rate_hz: float = Field(default=5.0, ge=0, description="Requests per second per device (lowered to fit max_total_rate_hz).")
    max_total_rate_hz: float = Field(default=HOST_BUDGET_HZ, gt=0,
                                     description="Requests per second of the whole workload at most (the host budget).")
    latency_jitter: float = Field(default=0.1, ge=0,
                                  description="σ of the lognormal factor exp(N(0, σ)) on each request's simulated latency.")


class RolloutSpec(_Strict):
    version: str = "2.0.0"
    waves: list[float] = [10, 50, 100]
    gates: list[str] = ["install_failure_ratio<=0.1"]
    bake_s: float = 3.0
    max_bake_s: float | None = Field(default=None, ge=0, description="Longest a wave may stay inconclusive before the "
                                     "controller pauses the rollout; None: the fleet's default.")
    min_reports: int = 1
    install_timeout_s: float = 120.0


class FaultSpec(_Strict):
    kind: Literal["latency", "broken_selftest", "input_drift", "broker_restart", "offline"]
    profile: str | None = None
    bundle: Literal["candidate", "baseline"] = "candidate"
    factor: float = 1.5
    after_s: float = 0.0
    shift: float = 0.5
    scale: float = 2.0
    every_s: float = 6.0
    down_s: float = 1.5
    fraction: float = 0.2
    for_s: float = 10.0


class ExpectSpec(_Strict):
    status: Literal["succeeded", "rolled_back", "aborted", "failed", "paused"] | None = None
    within_waves: int | None = None
    alerts: list[str] = []
    webhook_calls: int | None = None


class Scenario(_Strict):
    name: str
    description: str = ""
    devices: DeviceSpec
    workload: WorkloadSpec = WorkloadSpec()
    baseline_version: str = "1.0.0"
    rollout: RolloutSpec | None = None
    duration_s: float = 20.0
    telemetry_window_s: float = Field(default=1.0, gt=0, description="Agents' telemetry window (short: quick gate decisions).")
    faults: list[FaultSpec] = []
    expect: ExpectSpec = ExpectSpec()

    def faults_of(self, kind: str) -> list[FaultSpec]:
        return [f for f in self.faults if f.kind == kind]


def list_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.is_file():
        path = SCENARIOS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario {name_or_path!r}; known: {', '.join(list_scenarios())}")
    try:
        return Scenario.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"scenario {path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def device_latency_ms(profile: str) -> float:
    """The simulated compute time of one request on `profile`'s board (ms), before faults and jitter."""
    return DEVICE_LATENCY_MS.get(profile, UNKNOWN_DEVICE_LATENCY_MS)


def per_device_rate(rate_hz: float, max_total_rate_hz: float, devices: int) -> float:
    """Requests per second each device sends: the scenario's rate, lowered so that all `devices` together
    stay within the host budget."""
    return min(rate_hz, max_total_rate_hz / max(1, devices))


@dataclasses.dataclass
class WorkloadStats:
    """What one process's workload did, for the fidelity check; a worker process writes it as JSON when it
    stops (`to_json`), the parent reads it back (`from_json`)."""

    planned_hz: float = 0.0  # the per-device rate times this process's devices
    elapsed_s: float = 0.0  # how long the workload ran
    completed: int = 0  # requests answered or failed
    failed: int = 0
    offline: int = 0  # turns of a device that was offline: no request sent, and none planned
    real_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per profile, answered requests
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, profile: str, real_ms: float | None) -> None:
        """One request done: answered with `real_ms` of real (not simulated) latency, or failed (None)."""
        with self._lock:
            self.completed += 1
            if real_ms is None:
                self.failed += 1
            else:
                self.real_ms.setdefault(profile, []).append(round(real_ms, 3))

    def skip_offline(self) -> None:
        with self._lock:
            self.offline += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"planned_hz": self.planned_hz, "elapsed_s": self.elapsed_s, "completed": self.completed,
                    "failed": self.failed, "offline": self.offline, "real_ms": self.real_ms}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "WorkloadStats":
        return cls(**{key: data[key] for key in ("planned_hz", "elapsed_s", "completed", "failed", "offline", "real_ms")})


def fidelity(stats: Sequence[WorkloadStats], claimed_ms: Mapping[str, float], *, missing: int = 0) -> dict[str, Any]:
    """Whether the run produced the latencies it claims (see the module docstring for the tolerance).

    `stats`: every process's workload; `claimed_ms`: each profile's simulated base latency; `missing`:
    worker processes whose summary never came (their devices cannot be vouched for). A profile that
    answered no request distorted nothing; the rate check covers a host too busy to answer any."""
    profiles: dict[str, dict[str, Any]] = {}
    for profile, claimed in claimed_ms.items():
        samples = [ms for one in stats for ms in one.real_ms.get(profile, ())]
        row: dict[str, Any] = {"claimed_ms": claimed, "real_part_p50_ms": None, "real_part_p95_ms": None,
                               "distortion": None, "requests": len(samples), "judged_on": None, "ok": True}
        if samples:
            p50, p95 = (float(v) for v in np.percentile(samples, [50, 95]))
            judged_on, value = ("p95", p95) if len(samples) >= P95_MIN_REQUESTS else ("p50", p50)
            row.update(real_part_p50_ms=round(p50, 2), real_part_p95_ms=round(p95, 2), distortion=round(value / claimed, 4),
                       judged_on=judged_on, ok=value <= REAL_PART_TOLERANCE * claimed)
        profiles[profile] = row
    running = [one for one in stats if one.elapsed_s > 0]
    planned_hz = sum(max(0.0, one.planned_hz - one.offline / one.elapsed_s) for one in running)
    achieved_hz = sum(one.completed / one.elapsed_s for one in running)
    rate = {"planned_hz": round(planned_hz, 1), "achieved_hz": round(achieved_hz, 1),
            "ok": achieved_hz >= RATE_TOLERANCE * planned_hz}
    report: dict[str, Any] = {
        "ok": all(row["ok"] for row in profiles.values()) and rate["ok"] and not missing,
        "tolerance": {"real_part_p95_of_claimed": REAL_PART_TOLERANCE, "achieved_rate_of_planned": RATE_TOLERANCE},
        "profiles": profiles, "rate": rate,
    }
    if missing:
        report["missing_summaries"] = missing
    report["reason"] = saturation_reason(report)
    return report


def saturation_reason(report: Mapping[str, Any]) -> str | None:
    """One line saying why a `fidelity` report is not ok (None when it is)."""
    if report["ok"]:
        return None
    problems = []
    for profile, row in report["profiles"].items():
        if not row["ok"]:
            problems.append(f"{profile}'s real inference time {row['judged_on']} {row['real_part_' + row['judged_on'] + '_ms']:.1f} ms is "
                            f"{row['distortion'] * 100:.0f} % of its simulated {row['claimed_ms']:g} ms "
                            f"(tolerance {report['tolerance']['real_part_p95_of_claimed'] * 100:.0f} %)")
    rate = report["rate"]
    if not rate["ok"]:
        share = rate["achieved_hz"] / rate["planned_hz"]
        problems.append(f"the workload achieved {rate['achieved_hz']:g} of {rate['planned_hz']:g} planned requests/s "
                        f"({share * 100:.0f} %, tolerance {report['tolerance']['achieved_rate_of_planned'] * 100:.0f} %)")
    if report.get("missing_summaries"):
        problems.append(f"{report['missing_summaries']} worker process(es) left no workload summary")
    return f"host saturated: {'; '.join(problems)}; this run's verdict is not a judgement of the release"


class _BrokerCounters(TopicListener):
    """The broker's own count of PUBLISH messages, from Mosquitto's `$SYS/broker/publish/messages/{received,sent}`
    (updated every `sys_interval`; the testbed's broker uses 1 s). `snapshot()` is None on a broker that
    does not publish them (or denies `$SYS` to this client)."""

    def __init__(self, mqtt_url: str, ca_file: Path | None = None) -> None:
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        super().__init__(mqtt_url, "$SYS/broker/publish/messages/+", name="testbed-sys", ca_file=ca_file)

    def _on_message(self, client, userdata, message) -> None:
        try:
            value = float(message.payload)
        except ValueError:
            return
        with self._lock:
            self._values[message.topic.rsplit("/", 1)[1]] = value

    def snapshot(self) -> dict[str, float] | None:
        with self._lock:
            values = dict(self._values)
        return values if {"received", "sent"} <= set(values) else None


def _rates(before: dict[str, float] | None, after: dict[str, float] | None, seconds: float | None) -> dict[str, float] | None:
    """Messages per second between two counter snapshots."""
    if not before or not after or not seconds:
        return None
    return {key: round((after[key] - before[key]) / seconds, 1) for key in after if key in before}


class _Webhook:
    """The retrain trigger's receiving end: counts the alerts the fleet POSTs."""

    def __init__(self) -> None:
        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    calls.append(json.loads(body or b"{}"))
                except ValueError:
                    calls.append({"raw": body.decode(errors="replace")})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/retrain"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@dataclasses.dataclass
class SimulatedFleet:
    scenario: Scenario
    devices: int
    work_dir: Path
    mqtt_url: str | None = None
    on_event: Callable[[float, str], None] | None = None
    timeline: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rollout_s: float | None = None
    broker_rates: dict[str, float] | None = None  # PUBLISH messages/s while the rollout ran, from $SYS
    fleet_rates: dict[str, float] | None = None  # the fleet's handled messages/s over the same span
    per_process: int = AGENTS_PER_PROCESS  # devices beyond this run in worker processes of this many each
    secure: bool = True  # broker identities and topic rights (dynsec), agents requiring signed desired states
    # (False: an anonymous broker without identities, as before issue 10; no CLI switch, the benchmark has its own)
    tls: bool = False  # mqtts:// and HTTPS with a lab CA
    rate_hz: float = 0.0  # requests per second per device, within the host budget (set by `run`)
    workload_stats: WorkloadStats = dataclasses.field(default_factory=WorkloadStats)  # this process's workload
    # per device: its jitter generator (kept across an offline spell), and per thread: the simulated part
    # of the request that thread just made, for the fidelity check
    _jitter: dict[str, random.Random] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _simulated: threading.local = dataclasses.field(default_factory=threading.local, init=False, repr=False)

    def _event(self, text: str) -> None:
        elapsed = round(time.monotonic() - self._t0, 2)
        self.timeline.append({"t": elapsed, "event": text})
        if self.on_event:
            self.on_event(elapsed, text)

    # ------------------------------------------------------------------ setup
    def run(self) -> dict[str, Any]:
        from builder.cache import default_cache_dir
        from edgepack.signing import generate_keypair
        from testbeds.fleet_harness import FleetProcess, agent_configs, build_release, lab_pki
        from testbeds.mosquitto import MosquittoBroker

        self._t0 = time.monotonic()
        scenario, root = self.scenario, self.work_dir
        root.mkdir(parents=True, exist_ok=True)
        private, public = generate_keypair(root / "keys")
        profiles = scenario.devices.profiles
        self._event(f"building releases {scenario.baseline_version}" + (f" and {scenario.rollout.version}" if scenario.rollout else "")
                    + f" for {', '.join(profiles)}")
        cache = default_cache_dir()
        baseline = build_release(root, private, scenario.baseline_version, profiles, cache_dir=cache)
        candidate = []
        if scenario.rollout:
            candidate = build_release(root, private, scenario.rollout.version, profiles, cache_dir=cache,
                                      break_selftest=bool(scenario.faults_of("broken_selftest")))
        # Everything started is stopped on any failure, in reverse order: the broker, the counters, the webhook,
        # the fleet, then the devices (a refused upload or enrollment used to leave broker and fleet running).
        pki = lab_pki(root) if self.tls else None
        ca_file = pki.ca if pki else None
        with contextlib.ExitStack() as started:
            broker = started.enter_context(MosquittoBroker(extra_config="sys_interval 1\n", secure=self.secure,
                                                           tls=pki.broker if pki else None)) if not self.mqtt_url else None
            mqtt_url = self.mqtt_url or broker.url  # the agents': each logs in as its id with its credential
            self._broker_counters = _BrokerCounters(_sys_observer_url(broker, ca_file) if broker else mqtt_url, ca_file)
            started.callback(self._broker_counters.close)
            webhook = _Webhook()
            started.callback(webhook.close)
            fleet_args = ["--alert-webhook", webhook.url]
            tls = pki.fleet if pki else None
            fleet = started.enter_context(
                FleetProcess.for_broker(broker, root, trusted_key=public, extra_args=fleet_args, tls=tls) if broker
                else FleetProcess(root, mqtt_url, trusted_key=public, extra_args=fleet_args, tls=tls))
            self._event(f"fleet at {fleet.url}, broker at {mqtt_url}"
                        + (" (identities and topic rights enforced)" if broker and broker.secure else ""))
            self._fleet_url, self._verify = fleet.url, fleet.verify
            client = fleet.client()
            self.baseline_ids = [client.upload(p)["id"] for p in baseline]
            self.candidate_ids = [client.upload(p)["id"] for p in candidate]
            token = client.request("POST", "/devices/enrollment-tokens", json={"uses": self.devices, "labels": {"sim": scenario.name}})["token"]
            local = min(self.devices, self.per_process)
            if local < self.devices and any(f.kind in ("offline", "input_drift") for f in scenario.faults):
                raise ConfigError(f"scenario {scenario.name}: offline and input_drift faults run with at most {self.per_process} devices")
            agent_extra = {**_agent_extra(scenario.telemetry_window_s), **_secure_extra(self.secure, ca_file)}
            agents = agent_configs(root, local, profiles, fleet.url, mqtt_url, token, public, extra=agent_extra)
            workload = scenario.workload
            self.rate_hz = per_device_rate(workload.rate_hz, workload.max_total_rate_hz, self.devices)
            if self.rate_hz < workload.rate_hz:
                self._event(f"workload: {self.rate_hz:.3g} req/s per device (host budget {workload.max_total_rate_hz:g} req/s; "
                            f"the scenario asks {workload.rate_hz:g})")
            stop = threading.Event()
            threads: list[threading.Thread] = []
            workers: list[Any] = []
            summaries: list[Path] = []
            started.callback(_stop_devices, stop, threads, agents, workers)
            for start in range(local, self.devices, self.per_process):
                summaries.append(_worker_summary_path(root, start))
                workers.append(_start_worker(scenario, root, start, min(self.per_process, self.devices - start), profiles,
                                             fleet.url, mqtt_url, token, public, self.baseline_ids, self.candidate_ids,
                                             agent_extra, self.rate_hz))
            if workers:
                self._event(f"{len(workers)} worker process(es) run devices {local}..{self.devices - 1}")
            for agent in agents:
                agent.start()
                self._hook(agent)
            enrolled = wait_for(lambda: _workers_alive(workers, root) and _all_or_none(client.request("GET", "/devices"), self.devices),
                                300, 0.3, "every device to enroll")
            per_profile = {p: sum(d["profile"] == p for d in enrolled) for p in profiles}
            self._event(f"{self.devices} devices enrolled ({', '.join(f'{p}: {n}' for p, n in per_profile.items())})")
            self._install_baseline(client)
            threads.append(self._start_workload(agents, stop, self.rate_hz))
            for fault in scenario.faults_of("broker_restart"):
                if broker is not None:
                    threads.append(self._start_broker_flaps(broker, fault, stop))
            rollout = None
            if scenario.rollout:
                for fault in scenario.faults_of("offline"):
                    threads.append(self._start_offline(agents, fault, stop))
                rollout = self._run_rollout(client)
            else:
                self._observe_alerts(client, scenario.duration_s)
            status = rollout["status"] if rollout else None
            # a paused rollout leaves a mix: the started waves on the candidate, the rest on the baseline
            expected = (self.candidate_ids if status == "succeeded" else [*self.candidate_ids, *self.baseline_ids]
                        if status == "paused" else self.baseline_ids)
            converged = self._wait_converged(client, agents, expected)
            messages = _message_counts(fleet.url, fleet.verify)
            alerts = client.request("GET", "/alerts") if _fleet_has_alerts() else []
        # after every device stopped: the workers have written their workload summaries
        worker_stats = [WorkloadStats.from_json(json.loads(path.read_text())) for path in summaries if path.is_file()]
        report = fidelity([self.workload_stats, *worker_stats], {p: device_latency_ms(p) for p in profiles},
                          missing=len(summaries) - len(worker_stats))
        result = {
            "scenario": scenario.name,
            "devices": self.devices,
            "profiles": profiles,
            "secure": bool(self.secure and not self.mqtt_url), "tls": self.tls,
            "rollout": _rollout_summary(rollout),
            "alerts": alerts,
            "webhook_calls": len(webhook.calls),
            "converged": converged,
            "messages": messages,
            "rollout_s": self.rollout_s,
            # PUBLISH messages per second while the rollout ran: the broker's own counts, and the fleet's
            "broker_msg_per_s": self.broker_rates,
            "fleet_msg_per_s": self.fleet_rates,
            "duration_s": round(time.monotonic() - self._t0, 2),
            "fidelity": report,
            "saturated": not report["ok"],
            "timeline": self.timeline,
        }
        result["expectation_met"] = _check(scenario.expect, result) and not result["saturated"]
        return result

    def _hook(self, agent) -> None:
        """Simulated device speed and the latency fault, through the engine's device clock (its documented
        test seam): base x fault factor x jitter, added to the request's real latency, never slept."""
        latency_faults = [f for f in self.scenario.faults_of("latency") if f.profile in (None, agent.profile)]
        base_ms = device_latency_ms(agent.profile)
        sigma = self.scenario.workload.latency_jitter
        jitter = self._jitter.setdefault(agent.device_id, random.Random(agent.device_id))
        simulated = self._simulated

        def device_clock(bundle_id: str) -> float:
            factor = 1.0
            for fault in latency_faults:
                ids = self.candidate_ids if fault.bundle == "candidate" else self.baseline_ids
                if bundle_id in ids:
                    factor *= fault.factor
            simulated.ms = base_ms * factor * jitter.lognormvariate(0.0, sigma)
            return simulated.ms

        engine = wait_for(lambda: getattr(agent.agent, "engine", None), 30, 0.3, f"{agent.device_id}'s inference engine")
        engine.simulated_latency_ms = device_clock

    def _install_baseline(self, client) -> None:
        started = client.request("POST", "/rollouts", json={
            # staged like a real install, so hundreds of devices do not all download and report at once
            "bundle_id": self.baseline_ids[0], "selector": {"sim": self.scenario.name},
            "waves": [100] if self.devices <= 50 else [10, 40, 100],
            "gates": ["install_failure_ratio<=0"], "bake_s": 0, "min_reports": 1, "install_timeout_s": 300})
        final = wait_for(lambda: (s := client.request("GET", f"/rollouts/{started['id']}"))["status"] in FINAL and s, 600, 0.3,
                         "the baseline install")
        if final["status"] != "succeeded":
            raise RuntimeError(f"baseline install ended {final['status']}: {final['decisions'][-1:]}")
        self._event(f"baseline {self.scenario.baseline_version} active on every device")

    # ------------------------------------------------------------------ workload and faults
    def _start_workload(self, agents, stop: threading.Event, rate_hz: float) -> threading.Thread:
        """`rate_hz` requests per second to each of `agents`, until `stop`; what happened goes to
        `workload_stats`, each answered request's real latency (reported minus simulated) per profile."""
        data = np.load(Path(__file__).resolve().parents[1] / "examples" / "digits" / "data" / "val.npz")["input"].astype(np.float32)
        drifts = self.scenario.faults_of("input_drift")
        pool = ThreadPoolExecutor(max_workers=max(1, min(WORKLOAD_THREADS, len(agents))), thread_name_prefix="workload")
        rng = random.Random(0)
        stats = self.workload_stats = WorkloadStats(planned_hz=rate_hz * len(agents))
        simulated = self._simulated
        drift_logged = [False]
        started = time.monotonic()

        def one(agent) -> None:
            running = agent.agent
            if running is None:
                stats.skip_offline()
                return
            sample = data[rng.randrange(len(data))][None]
            elapsed = time.monotonic() - started
            for fault in drifts:
                if elapsed >= fault.after_s:
                    sample = sample * fault.scale + fault.shift
                    if not drift_logged[0]:
                        drift_logged[0] = True
                        self._event(f"input drift starts: inputs x{fault.scale:g} + {fault.shift:g}")
            simulated.ms = 0.0  # what this request's device clock adds (none before the clock is hooked in)
            try:
                result = running.engine.infer_detailed({"input": sample.astype(np.float32)})
            except Exception:  # noqa: BLE001 - counted: the telemetry gates judge errors
                stats.record(agent.profile, None)
            else:
                stats.record(agent.profile, result.latency_ms - simulated.ms)

        def loop() -> None:
            if rate_hz > 0 and agents:
                # one device's turn every `step`, round robin: the same rate as all of them at once every
                # period, without a burst of a whole fleet's requests at each tick
                step = 1.0 / (rate_hz * len(agents))
                next_turn = time.monotonic()
                for agent in itertools.cycle(agents):
                    if stop.is_set():
                        break
                    pool.submit(one, agent)
                    next_turn += step
                    delay = next_turn - time.monotonic()
                    if delay > 0:
                        stop.wait(delay)
            else:
                stop.wait()
            stats.elapsed_s = time.monotonic() - started
            pool.shutdown(wait=True, cancel_futures=True)

        thread = threading.Thread(target=loop, name="workload", daemon=True)
        thread.start()
        return thread

    def _start_broker_flaps(self, broker, fault: FaultSpec, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(fault.every_s):
                self._event(f"network: broker down for {fault.down_s:g} s")
                broker.stop()
                stop.wait(fault.down_s)
                broker.start()

        thread = threading.Thread(target=loop, name="broker-flaps", daemon=True)
        thread.start()
        return thread

    def _start_offline(self, agents, fault: FaultSpec, stop: threading.Event) -> threading.Thread:
        chosen = agents[:: max(1, round(1 / fault.fraction))][: max(1, int(len(agents) * fault.fraction))]

        def loop() -> None:
            if stop.wait(fault.after_s):
                return
            for agent in chosen:
                agent.stop()
            self._event(f"{len(chosen)} devices offline: {', '.join(a.device_id for a in chosen)}")
            if stop.wait(fault.for_s):
                return
            for agent in chosen:
                agent.start()
                self._hook(agent)
            self._event(f"{len(chosen)} devices back online")

        thread = threading.Thread(target=loop, name="offline", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ rollout and observation
    def _run_rollout(self, client) -> dict[str, Any]:
        spec = self.scenario.rollout
        time.sleep(1.0)  # let a first telemetry window of the baseline arrive
        started = client.request("POST", "/rollouts", json={
            "bundle_id": self.candidate_ids[0], "selector": {"sim": self.scenario.name}, "waves": spec.waves,
            "gates": spec.gates, "bake_s": spec.bake_s, "min_reports": spec.min_reports, "install_timeout_s": spec.install_timeout_s,
            **({"max_bake_s": spec.max_bake_s} if spec.max_bake_s is not None else {})})
        self._event(f"rollout {started['id'][:8]} of {spec.version} started: waves {','.join(f'{w:g}' for w in spec.waves)}, "
                    f"gates {'; '.join(spec.gates)}")
        rollout_started = time.monotonic()
        broker_before, fleet_before = self._broker_counters.snapshot(), _message_counts(self._fleet_url, self._verify)
        seen_decisions = 0
        seen_wave = -1
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = client.request("GET", f"/rollouts/{started['id']}")
            if status["current_wave"] != seen_wave and status["current_wave"] >= 0:
                seen_wave = status["current_wave"]
                if seen_wave < len(status["waves"]):
                    wave = status["waves"][seen_wave]
                    self._event(f"wave {seen_wave + 1} ({wave['percent']:g} %): {wave['members']} devices")
                else:  # the step after the last wave that moves the devices held back as its control
                    self._event(f"hold-back step: {(status.get('holdback') or {}).get('members')} devices")
            for decision in status["decisions"][seen_decisions:]:
                reason = decision["evidence"].get("reason") or ""
                if decision["decision"] != "hold" or seen_decisions == 0 or status["decisions"][seen_decisions - 1]["decision"] != "hold":
                    step = f"wave {decision['wave'] + 1}" if decision["wave"] < len(status["waves"]) else "hold-back step"
                    self._event(f"{step}: {decision['decision']} — {reason}")
                seen_decisions += 1
            if status["status"] in ENDED:
                self.rollout_s = round(time.monotonic() - rollout_started, 2)
                self.broker_rates = _rates(broker_before, self._broker_counters.snapshot(), self.rollout_s)
                self.fleet_rates = _rates(fleet_before, _message_counts(self._fleet_url, self._verify), self.rollout_s)
                self._event(f"rollout {status['status']} after {self.rollout_s} s")
                return status
            time.sleep(0.5)
        raise TimeoutError("the rollout did not finish within 900 s")

    def _observe_alerts(self, client, duration_s: float) -> None:
        seen = set()
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            if _fleet_has_alerts():
                for alert in client.request("GET", "/alerts"):
                    if alert["id"] not in seen:
                        seen.add(alert["id"])
                        self._event(f"alert {alert['kind']} on {alert.get('device_id')}: {json.dumps(alert.get('details'))[:160]}")
            time.sleep(0.5)

    def _wait_converged(self, client, agents, expected_ids: list[str]) -> bool:
        """Until every device is settled (active or rolled back) on one of `expected_ids`."""
        try:
            wait_for(lambda: all(d["current_bundle_id"] in expected_ids and d["phase"] in ("active", "rolled_back")
                                 for d in client.request("GET", "/devices")), 180, 0.3, "every device to converge")
        except TimeoutError:
            self._event("not every device converged within 180 s")
            return False
        runs = {tuple(self.candidate_ids): "the candidate", tuple(self.baseline_ids): "the baseline"}
        self._event(f"every device runs {runs.get(tuple(expected_ids), 'the candidate or the baseline (the rollout is paused)')}")
        return True


def _fleet_has_alerts() -> bool:
    try:
        from fleet.models import Alert  # noqa: F401
    except ImportError:
        return False
    return True


def _worker_summary_path(root: Path, start: int) -> Path:
    """Where the worker running devices from `start` on writes its workload summary when it stops."""
    return root / f"worker-{start}.workload.json"


def _start_worker(scenario: Scenario, root: Path, start: int, count: int, profiles: list[str], fleet_url: str, mqtt_url: str,
                  token: str, public: Path, baseline_ids: list[str], candidate_ids: list[str], agent_extra: dict[str, Any],
                  rate_hz: float):
    import subprocess
    import sys

    spec = {"scenario": scenario.model_dump(mode="json"), "root": str(root), "start": start, "count": count,
            "profiles": profiles, "fleet_url": fleet_url, "mqtt_url": mqtt_url, "token": token, "public": str(public),
            "baseline_ids": baseline_ids, "candidate_ids": candidate_ids, "agent_extra": agent_extra, "rate_hz": rate_hz,
            "summary": str(_worker_summary_path(root, start))}
    _worker_summary_path(root, start).unlink(missing_ok=True)  # a kept --work-dir's last run must not count
    log = open(root / f"worker-{start}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "testbeds.sim_worker", json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root)


def _stop_devices(stop: threading.Event, threads: list[threading.Thread], agents: list[Any], workers: list[Any]) -> None:
    """Stop the workload threads, the in-process agents and the worker processes (a stuck one is killed)."""
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    for agent in agents:
        agent.stop()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a stuck worker must not keep the run alive
            worker.kill()


def _all_or_none(devices: list[dict], count: int) -> list[dict] | None:
    """`devices` once the fleet lists all `count` of them (for `wait_for`, which returns the first truthy value)."""
    return devices if len(devices) == count else None


def _workers_alive(workers: list[Any], root: Path) -> bool:
    """True while every worker process runs; a RuntimeError with its log's tail when one has exited."""
    for worker in workers:
        if worker.poll() is not None:
            logs = sorted(root.glob("worker-*.log"))
            tail = "".join(path.read_text(errors="replace")[-1500:] for path in logs)
            raise RuntimeError(f"a testbed worker process exited with {worker.returncode}:\n{tail}")
    return True


def _message_counts(fleet_url: str, verify: Any = True) -> dict[str, float]:
    """MQTT messages the fleet handled and published, from its Prometheus endpoint."""
    import re

    import httpx

    text = httpx.get(fleet_url + "/metrics", timeout=10, verify=verify).text
    counts: dict[str, float] = {}
    for kind in ("status", "telemetry"):
        match = re.search(rf'^edgepack_mqtt_messages_total{{kind="{kind}"}}\s+([0-9.e+]+)$', text, re.M)
        counts[kind] = float(match.group(1)) if match else 0.0
    match = re.search(r"^edgepack_desired_states_published_total\s+([0-9.e+]+)$", text, re.M)
    counts["desired"] = float(match.group(1)) if match else 0.0
    return counts


def _agent_extra(window_s: float) -> dict[str, Any]:
    """Short telemetry windows so gates get data quickly."""
    return {"telemetry": {"window_s": window_s}}


def _secure_extra(secure: bool, ca_file: Path | None) -> dict[str, Any]:
    """The agent settings of the secure path: signed desired states required, the lab CA for mqtts:// and HTTPS."""
    return {**({"require_signed_desired": True} if secure else {}), **({"ca_file": str(ca_file)} if ca_file else {})}


SYS_OBSERVER = "testbed-observer"


def _sys_observer_url(broker, ca_file: Path | None) -> str:
    """The broker URL of an identity that may read `$SYS` and nothing else (no device or fleet identity may),
    created over the dynamic security plugin with the fleet's identity; the plain URL on an open broker."""
    if not broker.secure:
        return broker.url
    from edgepack.mqtt import MqttEndpoint
    from fleet.broker.dynsec import DynsecClient

    password = secrets.token_urlsafe(16)
    acls = [{"acltype": kind, "topic": "$SYS/#", "allow": True} for kind in ("subscribePattern", "publishClientReceive")]
    client = DynsecClient(MqttEndpoint.from_url(broker.fleet_url, ca_file=ca_file))
    try:
        client.run_checked([
            {"command": "createRole", "rolename": SYS_OBSERVER, "acls": acls},
            {"command": "createClient", "username": SYS_OBSERVER, "password": password, "roles": [{"rolename": SYS_OBSERVER}]}])
    finally:
        client.close()
    return broker.url.replace("://", f"://{SYS_OBSERVER}:{password}@", 1)


def _rollout_summary(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    last = {}
    for decision in status["decisions"]:
        last[decision["wave"]] = decision
    return {
        "id": status["id"],
        "status": status["status"],
        "waves": [{"percent": wave["percent"], "decision": (last.get(wave["index"]) or {}).get("decision"),
                   "evidence": (last.get(wave["index"]) or {}).get("evidence")} for wave in status["waves"]],
    }


def _check(expect: ExpectSpec, result: dict[str, Any]) -> bool:
    ok = result["converged"]
    rollout = result["rollout"]
    if expect.status:
        ok &= rollout is not None and rollout["status"] == expect.status
    if expect.within_waves and rollout:
        decided = [i for i, w in enumerate(rollout["waves"]) if w["decision"] == "rollback"]
        ok &= bool(decided) and decided[0] < expect.within_waves
    for kind in expect.alerts:
        ok &= any(alert.get("kind") == kind for alert in result["alerts"])
    if expect.webhook_calls is not None:
        ok &= result["webhook_calls"] == expect.webhook_calls
    return bool(ok)
