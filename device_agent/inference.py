"""Inference on the device: the active model behind one reference, swapped without failing a request.

    engine = InferenceEngine()
    engine.swap(slot_dir, manifest, bundle_id=...)   # load the new session first, then publish it
    outputs = engine.infer({"input": array})          # {output name: array}
    result = engine.infer_detailed(feeds)             # outputs + the bundle that answered + latency
    engine.add_observer(on_event)                     # an InferenceEvent after every request

How a switch stays invisible to requests (read-copy-update): the engine holds the active model as
one immutable `LoadedModel`. A request reads that reference once (one attribute read, atomic under
the GIL, no lock on the request path) and runs to the end on the model it got. `swap` loads and
warms up the new session first, then replaces the reference. The old session is never closed while
a request holds it: it is released by reference counting when the last request using it returns
(the grace period of RCU). So a request in flight during a switch is answered by the old model, the
next one by the new model, and none fails because of the switch. A load that fails leaves the old
model serving.

Input checks, before the runtime sees anything: exactly the manifest's input names (`manifest.io`),
the rank and every fixed dimension of each shape (named or unknown dimensions take any size), and
the dtype. A value of another numeric dtype is converted when numpy's "same_kind" casting allows it
(int or float64 lists to a float32 input: yes; floats to an int64 input: no), because JSON cannot
say float32. A bad input is an `InvalidInput` (HTTP 400), a runtime failure an `InferenceFailed`
(500), a request with no model loaded `NoActiveModel` (503); all are `InferenceError`s.

Observers receive an `InferenceEvent` in the request's thread after the answer is computed (its
latency does not include them), for answered requests and for errors; requests refused for want of
a model produce none. An observer must be quick (telemetry, sampling for shadow mode) and must not
modify the arrays it gets. An observer that raises never breaks the request: the first exception of
each observer is logged with its traceback, every one is counted in `observer_errors`.

Test seams for simulated devices and faults (explicit, off by default; real agents leave all three
None): `pre_infer(bundle_id)` runs before the runtime in every request and may sleep or raise (raising
makes the request fail as a runtime error); `latency_multiplier(bundle_id) -> float` makes a request
take that many times its real run time (1.5 = answers 1.5x slower); `simulated_latency_ms(bundle_id)
-> float` is a device clock: called once per answered request with the answering bundle, its value (ms
of simulated device compute) is added to the request's measured wall time in the latency that
`InferenceResult`, observers and so telemetry report, without waiting for it. The request returns at
host speed and the real inference is still timed for real: this is how the simulated fleet
(testbeds/sim.py) gives hundreds of agents on one host their boards' speed, where sleeping threads
would each wake late by the host's scheduling delay and blur every latency ratio.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgepack.errors import EdgepackError
from edgepack.manifest import BundleManifest, IoTensor

log = logging.getLogger(__name__)

Observer = Callable[["InferenceEvent"], None]
PreInferHook = Callable[[str], None]
LatencyMultiplier = Callable[[str], float]
SimulatedLatency = Callable[[str], float]

_perf_counter = time.perf_counter
_SPIN_BELOW_S = 0.002  # sleeps shorter than this overshoot by tens of microseconds: spin instead


class InferenceError(EdgepackError):
    """A request the engine could not answer; `http_status` says whose fault (400 input, 500 runtime)."""

    exit_code = 1
    http_status = 500


class InvalidInput(InferenceError):
    """The request's inputs do not match the model's names, dtypes or shapes (attribute: input_name)."""

    http_status = 400


class InferenceFailed(InferenceError):
    """The runtime failed on inputs that passed the checks (attribute: bundle_id)."""

    http_status = 500


class NoActiveModel(InferenceError):
    """No model is loaded yet (before the first install), so there is nothing to answer with."""

    http_status = 503


# ---------------------------------------------------------------------------------------------------
# values


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output as the manifest declares it; `shape` has None for any-size dimensions."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None
    dim_names: tuple[str, ...] = ()

    @property
    def exact_shape(self) -> tuple[int, ...] | None:
        """The shape when every dimension is fixed (one tuple comparison checks it), else None."""
        if self.shape is None or any(d is None for d in self.shape):
            return None
        return self.shape  # type: ignore[return-value]

    @property
    def batch_tail(self) -> tuple[int, ...] | None:
        """The fixed dimensions after a dynamic first (batch) one, when that is the only dynamic one, else None."""
        if not self.shape or self.shape[0] is not None:
            return None
        tail = self.shape[1:]
        return None if any(d is None for d in tail) else tail  # type: ignore[return-value]

    @classmethod
    def from_manifest(cls, entry: IoTensor) -> "TensorSpec":
        try:
            dtype = np.dtype(entry.dtype) if entry.dtype else None
        except TypeError:
            dtype = None
        raw = entry.shape
        shape = tuple(int(d) if isinstance(d, int) and d > 0 else None for d in raw)
        names = tuple(str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?") for d in raw)
        return cls(name=entry.name, dtype=dtype, shape=shape, dim_names=names)

    def describe_shape(self) -> str:
        return "[" + ", ".join(self.dim_names) + "]" if self.shape is not None else "any shape"

    def coerce(self, value: Any) -> np.ndarray:
        """`value` as an array this input accepts, or InvalidInput saying what is wrong with it."""
        if type(value) is not np.ndarray:
            try:
                value = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise InvalidInput(f"input {self.name!r}: not a rectangular array of numbers ({_first_line(exc)})",
                                   input_name=self.name) from None
        dtype = self.dtype
        if dtype is not None and value.dtype != dtype:
            if value.dtype.kind not in "biuf" or not np.can_cast(value.dtype, dtype, "same_kind"):
                raise InvalidInput(f"input {self.name!r}: dtype {value.dtype.name}, expected {dtype.name}",
                                   input_name=self.name)
            value = value.astype(dtype)
        shape = self.shape
        if shape is not None:
            if value.ndim != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape, strict=True)):
                raise InvalidInput(f"input {self.name!r}: shape {list(value.shape)}, expected {self.describe_shape()}",
                                   input_name=self.name)
        return value


@dataclass(frozen=True)
class LoadedModel:
    """A bundle's model loaded in its runtime; never changed after `swap` publishes it."""

    bundle_id: str
    slot_dir: Path
    manifest: BundleManifest
    session: Any  # device_agent.runtimes.ModelSession
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    loaded_at: float = 0.0
    # (name, dtype, exact shape, batch-free tail shape, spec) per input, precomputed for the per-request checks
    checks: tuple[tuple[str, Any, Any, Any, TensorSpec], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", tuple((spec.name, spec.dtype, spec.exact_shape, spec.batch_tail, spec)
                                                 for spec in self.inputs))

    @property
    def runtime(self) -> str:
        return self.manifest.runtime

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    def io(self) -> dict[str, list[dict]]:
        """The manifest's io signature (names, dtypes, shapes), JSON-ready."""
        return self.manifest.io.model_dump(mode="json")


class InferenceEvent(NamedTuple):
    """What observers learn about one request (the arrays are the engine's: read, never modify).

    A NamedTuple rather than a frozen dataclass: one is built per request, and this is 4x cheaper.
    """

    bundle_id: str
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None
    latency_ms: float
    error: str | None
    ts: float
    error_kind: str | None = None  # "input" (the caller's fault, HTTP 400) or "runtime" (the model's, 500)


class InferenceResult(NamedTuple):
    """One answer: the outputs, the bundle that computed them, and how long it took."""

    outputs: dict[str, np.ndarray]
    bundle_id: str
    latency_ms: float


@dataclass
class _ObserverEntry:
    fn: Observer
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


# ---------------------------------------------------------------------------------------------------
# the engine


class InferenceEngine:
    """The device's active model for every caller (Python API, HTTP server, shadow mode); thread-safe."""

    def __init__(self, *, pre_infer: PreInferHook | None = None, latency_multiplier: LatencyMultiplier | None = None,
                 simulated_latency_ms: SimulatedLatency | None = None, warm_up: bool = True) -> None:
        self.pre_infer = pre_infer  # test seam, see the module docstring
        self.latency_multiplier = latency_multiplier  # test seam, see the module docstring
        self.simulated_latency_ms = simulated_latency_ms  # test seam (a device clock), see the module docstring
        self.warm_up = warm_up
        self._swap_lock = threading.RLock()  # one swap/publish at a time, so the last one called wins
        self._model: LoadedModel | None = None  # replaced, never mutated: requests read it once, without a lock
        self._observers: tuple[_ObserverEntry, ...] = ()  # likewise
        self._observer_lock = threading.Lock()
        self.observer_errors = 0
        self.swaps = 0

    # -- the model -----------------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        """The model new requests get now (None before the first swap); holding it keeps its session alive."""
        return self._model

    @property
    def active_bundle_id(self) -> str | None:
        model = self._model
        return model.bundle_id if model is not None else None

    def load(self, slot_dir: Path, manifest: BundleManifest, *, bundle_id: str | None = None) -> LoadedModel:
        """Load (and warm up) a bundle's model without publishing it; ModelError when the runtime cannot."""
        from device_agent.runtimes import adapter_for

        slot_dir = Path(slot_dir)
        bundle_id = bundle_id or f"{manifest.name}-{manifest.version}"
        session = adapter_for(manifest.runtime).load(slot_dir, manifest)
        inputs = tuple(TensorSpec.from_manifest(entry) for entry in manifest.io.inputs)
        outputs = tuple(TensorSpec.from_manifest(entry) for entry in manifest.io.outputs)
        model = LoadedModel(bundle_id=bundle_id, slot_dir=slot_dir, manifest=manifest, session=session,
                            inputs=inputs, outputs=outputs, loaded_at=time.time())
        if self.warm_up:
            self._warm_up(model)
        return model

    def swap(self, slot_dir: Path, manifest: BundleManifest, *, bundle_id: str | None = None) -> LoadedModel:
        """Serve the bundle at `slot_dir` from the next request on; in-flight requests finish on the old model.

        The new session is loaded before anything changes: if that fails (ModelError, RuntimeUnavailable)
        the old model keeps serving and the error propagates.
        """
        with self._swap_lock:
            model = self.load(slot_dir, manifest, bundle_id=bundle_id)
            self.publish(model)
        return model

    def publish(self, model: LoadedModel | None) -> None:
        """Make `model` (already loaded) the one new requests get; None unloads.

        The previous model is only dropped here: requests still running on it keep it alive, and the
        last one to return frees its session.
        """
        with self._swap_lock:
            old, self._model = self._model, model
            self.swaps += 1
        if old is not None:
            log.info("inference switched from %s to %s", old.bundle_id[:12], model.bundle_id[:12] if model is not None else "nothing")

    def clear(self) -> None:
        """Stop serving: requests in flight finish, new ones get NoActiveModel."""
        self.publish(None)

    def close(self) -> None:
        """The same as `clear`: the engine drops its model; sessions go when their last request returns."""
        self.clear()

    # -- observers -----------------------------------------------------------------------------------

    def add_observer(self, fn: Observer) -> None:
        """Call `fn(event)` after every request, in the request's thread."""
        with self._observer_lock:
            self._observers = (*self._observers, _ObserverEntry(fn))

    def remove_observer(self, fn: Observer) -> None:
        with self._observer_lock:
            self._observers = tuple(entry for entry in self._observers if entry.fn is not fn)

    # -- requests ------------------------------------------------------------------------------------

    def infer(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """The active model's outputs for `inputs` ({input name: array}, or one array for a one-input model)."""
        return self.infer_detailed(inputs).outputs

    def infer_detailed(self, inputs: Mapping[str, Any] | np.ndarray) -> InferenceResult:
        """Like `infer`, also naming the bundle that answered (which a concurrent swap cannot change)."""
        # The hot path of every request: keep the Python around the runtime to a few microseconds.
        started = _perf_counter()
        model = self._model  # read once: this request's model, whatever a swap does meanwhile
        if model is None:
            raise NoActiveModel("no model is active on this device yet")
        feeds: Mapping[str, np.ndarray] = {}  # what observers see of a request refused before its inputs passed
        try:
            feeds = _check_inputs(model, inputs)
            if self.pre_infer is not None:
                self.pre_infer(model.bundle_id)
            if self.latency_multiplier is None:
                outputs = model.session.run(feeds)
            else:
                run_started = _perf_counter()
                outputs = model.session.run(feeds)
                _stretch(_perf_counter() - run_started, self.latency_multiplier(model.bundle_id))
            simulated_ms = self.simulated_latency_ms(model.bundle_id) if self.simulated_latency_ms is not None else 0.0
        except InferenceError as exc:
            self._notify(model.bundle_id, feeds, None, started, exc.message, "input" if exc.http_status < 500 else "runtime")
            raise
        except Exception as exc:  # the runtime's own exception types, or a fault injected by a test seam
            message = f"{model.runtime or 'runtime'} failed on bundle {model.bundle_id[:12]}: {_first_line(exc)}"
            self._notify(model.bundle_id, feeds, None, started, message, "runtime")
            raise InferenceFailed(message, bundle_id=model.bundle_id) from exc
        latency_ms = (_perf_counter() - started) * 1000.0 + simulated_ms
        if self._observers:
            self._emit(InferenceEvent(model.bundle_id, feeds, outputs, latency_ms, None, time.time()))
        return InferenceResult(outputs, model.bundle_id, latency_ms)

    # -- internals -----------------------------------------------------------------------------------

    def _notify(self, bundle_id: str, feeds: Mapping[str, Any], outputs: Any, started: float, error: str, kind: str) -> None:
        if self._observers:
            latency_ms = (time.perf_counter() - started) * 1000.0
            self._emit(InferenceEvent(bundle_id, feeds, outputs, latency_ms, error, time.time(), kind))

    def _emit(self, event: InferenceEvent) -> None:
        for entry in self._observers:
            try:
                entry.fn(event)
            except Exception:  # an observer's bug must not fail the request: log its first one, count all
                with entry.lock:
                    entry.failures += 1
                    first = entry.failures == 1
                with self._observer_lock:
                    self.observer_errors += 1
                if first:
                    log.exception("inference observer %r failed (further failures of it are only counted)", entry.fn)

    def _warm_up(self, model: LoadedModel) -> None:
        """One run before publishing, so the first real request does not pay the runtime's lazy setup."""
        feeds = _warm_up_feeds(model)
        if feeds is None:
            return
        try:
            model.session.run(feeds)
        except Exception as exc:  # the self-test already passed; a warm-up failure is only worth a log line
            log.warning("warm-up run of bundle %s failed: %s", model.bundle_id[:12], _first_line(exc))


def _check_inputs(model: LoadedModel, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
    """The feeds for `model`: a new dict of checked arrays, or InvalidInput naming what is wrong."""
    if type(inputs) is dict and len(inputs) == len(model.inputs):
        # Fast path: arrays of the declared dtype and fully fixed shape (or any batch size in front of fixed
        # dimensions) pass with a few comparisons.
        feeds = {}
        for name, dtype, exact_shape, tail, spec in model.checks:
            value = inputs.get(name)
            if type(value) is np.ndarray and value.dtype == dtype and (
                    value.shape == exact_shape or (tail is not None and value.shape[1:] == tail and value.ndim == len(tail) + 1)):
                feeds[name] = value
            elif value is None and name not in inputs:
                break  # a missing name: the slow path words the error
            else:
                feeds[name] = spec.coerce(value)
        else:
            return feeds
    if isinstance(inputs, np.ndarray):  # the only input of whichever model this request got
        if len(model.inputs) != 1:
            raise InvalidInput(f"bundle {model.bundle_id[:12]} takes {len(model.inputs)} inputs {list(model.input_names)}: "
                               "pass them by name")
        inputs = {model.inputs[0].name: inputs}
    if not isinstance(inputs, Mapping):
        raise InvalidInput(f"inputs must map input names to arrays, got {type(inputs).__name__}")
    specs = model.inputs
    if len(inputs) != len(specs) or any(spec.name not in inputs for spec in specs):
        expected = [spec.name for spec in specs]
        missing = [name for name in expected if name not in inputs]
        unexpected = [str(name) for name in inputs if name not in expected]
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else ""]
        raise InvalidInput(f"bundle {model.bundle_id[:12]} takes inputs {expected}: " + ", ".join(p for p in parts if p),
                           input_name=(missing or unexpected or [None])[0])
    return {spec.name: spec.coerce(inputs[spec.name]) for spec in specs}


def _warm_up_feeds(model: LoadedModel) -> dict[str, np.ndarray] | None:
    feeds = {}
    for spec in model.inputs:
        if spec.dtype is None or spec.shape is None:
            return None
        feeds[spec.name] = np.zeros([d if d is not None else 1 for d in spec.shape], dtype=spec.dtype)
    return feeds


def _stretch(elapsed_s: float, multiplier: float) -> None:
    """Wait so that a run that took `elapsed_s` takes `multiplier` times as long."""
    extra = elapsed_s * (multiplier - 1.0)
    if extra <= 0:
        return
    if extra >= _SPIN_BELOW_S:
        time.sleep(extra)
        return
    deadline = time.perf_counter() + extra
    while time.perf_counter() < deadline:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
