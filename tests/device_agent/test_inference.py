"""Inference on real bundles in real runtimes: input checks, HTTP bodies, switches under load, observers."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import secrets
import tarfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from device_agent.http_server import InferenceServer
from device_agent.inference import InferenceEngine, InferenceError, InferenceEvent, InferenceFailed, InvalidInput, NoActiveModel
from edgepack.bundle import manifest_from_bytes, open_bundle
from edgepack.manifest import BUNDLE_FORMAT, BundleManifest, parse_manifest
from tests.edgepack.samples import manifest_content
from edgepack.signing import load_public_key

SAMPLE = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# fixtures: bundles extracted as an agent's slots would hold them


def _extract(bundle, root: Path, public_key: Path) -> tuple[Path, dict, str]:
    slot = root / f"slot-{bundle.ref.id[:12]}"
    verified = open_bundle(bundle.path, [load_public_key(public_key)])
    verified.extract(slot)
    return slot, manifest_from_bytes((slot / "manifest.json").read_bytes()), bundle.ref.id


@pytest.fixture(scope="module")
def slots(bundles, tmp_path_factory) -> dict[str, tuple[Path, BundleManifest, str]]:
    root = tmp_path_factory.mktemp("slots")
    return {name: _extract(getattr(bundles, name), root, bundles.public_key) for name in ("onnx", "onnx_as_tensorrt", "v1")}


@pytest.fixture(scope="module")
def openvino_slot(bundles, tmp_path_factory) -> tuple[Path, BundleManifest, str]:
    """The onnx bundle remade around an OpenVINO IR of the same model (its self-test stays valid)."""
    import sys

    sys.modules.setdefault("openvino_telemetry", None)
    import openvino as ov

    from edgepack.bundle import inspect_bundle, write_bundle
    from edgepack.signing import load_private_key

    root = tmp_path_factory.mktemp("openvino")
    with tarfile.open(bundles.onnx.path) as tar:
        members = {row["path"]: tar.extractfile(row["path"]).read() for row in inspect_bundle(bundles.onnx.path)["files"]}
    (root / "model.onnx").write_bytes(members.pop("model/model.onnx"))
    ov.save_model(ov.convert_model(str(root / "model.onnx")), str(root / "model.xml"), compress_to_fp16=False)
    members["model/model.xml"] = (root / "model.xml").read_bytes()
    members["model/model.bin"] = (root / "model.bin").read_bytes()
    manifest = {k: v for k, v in inspect_bundle(bundles.onnx.path)["manifest"].items() if k not in ("format", "files")}
    manifest.update({"version": "1.0.0-openvino", "runtime": "openvino", "model": "model/model.xml", "devices": ["CPU"],
                     "model_files": ["model/model.bin", "model/model.xml"], "model_format": "openvino", "execution_providers": []})
    info = write_bundle(root / "openvino.edgepack", members, manifest, load_private_key(bundles.keys_dir / "edgepack.key"))
    slot = root / "slot"
    open_bundle(info.path, [load_public_key(bundles.public_key)]).extract(slot)
    return slot, manifest_from_bytes((slot / "manifest.json").read_bytes()), "openvino-" + secrets.token_hex(4)


def _bare_logits(slot: Path, sample: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(slot / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": sample})[0]


@pytest.fixture
def engine(slots) -> InferenceEngine:
    engine = InferenceEngine()
    slot, manifest, bundle_id = slots["onnx"]
    engine.swap(slot, manifest, bundle_id=bundle_id)
    yield engine
    engine.close()


@pytest.fixture
def server(engine):
    server = InferenceServer(engine, port=0, max_body_bytes=64 * 1024)
    server.start()
    yield server
    server.stop()


def _post(server: InferenceServer, body: bytes, content_type: str, path: str = "/v1/infer") -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _get(server: InferenceServer, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# the engine


def test_the_engine_answers_with_the_active_bundle_like_a_bare_session(engine, slots):
    slot, _, bundle_id = slots["onnx"]

    result = engine.infer_detailed({"input": SAMPLE})

    assert engine.active_bundle_id == bundle_id and result.bundle_id == bundle_id
    np.testing.assert_allclose(result.outputs["logits"], _bare_logits(slot, SAMPLE), rtol=1e-6)
    assert result.latency_ms > 0
    assert engine.infer({"input": SAMPLE.tolist()})["logits"].shape == (1, 10)  # lists are arrays too
    np.testing.assert_array_equal(engine.infer(SAMPLE)["logits"], result.outputs["logits"])  # one-input model: a bare array


@pytest.mark.parametrize(("inputs", "message"), [
    ({}, "takes inputs ['input']: missing ['input']"),
    ({"input": SAMPLE, "extra": SAMPLE}, "unexpected ['extra']"),
    ({"image": SAMPLE}, "missing ['input'], unexpected ['image']"),
    ({"input": SAMPLE.reshape(1, 64)}, "input 'input': shape [1, 64], expected [1, 1, 8, 8]"),
    ({"input": np.zeros((1, 1, 8, 9), np.float32)}, "shape [1, 1, 8, 9], expected [1, 1, 8, 8]"),
    ({"input": np.array([["a"] * 8] * 8)}, "input 'input': dtype str"),
    ({"input": np.zeros((1, 1, 8, 8), np.complex64)}, "dtype complex64, expected float32"),
    ({"input": [[1, 2], [3]]}, "input 'input': not a rectangular array of numbers"),
    ([SAMPLE], "inputs must map input names to arrays, got list"),
])
def test_bad_inputs_are_refused_before_the_runtime_with_a_clear_message(engine, inputs, message):
    with pytest.raises(InvalidInput) as caught:
        engine.infer(inputs)

    assert message in caught.value.message
    assert caught.value.http_status == 400 and isinstance(caught.value, InferenceError)


def test_an_input_with_a_dynamic_batch_takes_any_batch_and_still_checks_every_fixed_dimension(tmp_path):
    # the example model as exported (batch dimension left dynamic), in a slot whose manifest says so
    slot = tmp_path / "slot"
    (slot / "model").mkdir(parents=True)
    model = (Path(__file__).resolve().parents[2] / "examples/digits/model.onnx").read_bytes()
    (slot / "model" / "model.onnx").write_bytes(model)
    io_signature = {"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
                    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}
    manifest = parse_manifest({**manifest_content(version="dyn", io=io_signature), "format": BUNDLE_FORMAT,
                               "files": {"model/model.onnx": {"sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}}})
    engine = InferenceEngine()
    engine.swap(slot, manifest)
    try:
        batch = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
        assert engine.infer({"input": batch})["logits"].shape == (5, 10)
        np.testing.assert_allclose(engine.infer({"input": batch[2:3]})["logits"], engine.infer({"input": batch})["logits"][2:3],
                                   rtol=1e-5, atol=1e-6)
        for wrong in [(5, 1, 8, 9), (5, 8, 8), (5, 1, 8, 8, 1), (5, 2, 8, 8)]:
            with pytest.raises(InvalidInput) as caught:
                engine.infer({"input": np.zeros(wrong, np.float32)})
            assert f"shape {list(wrong)}, expected [batch, 1, 8, 8]" in caught.value.message
    finally:
        engine.close()


def test_numbers_of_another_kind_that_cast_safely_are_accepted(engine):
    as_float64 = engine.infer({"input": SAMPLE.astype(np.float64)})["logits"]
    as_ints = engine.infer({"input": np.ones((1, 1, 8, 8), np.int64)})["logits"]

    np.testing.assert_allclose(as_float64, engine.infer({"input": SAMPLE})["logits"], rtol=1e-6)
    assert as_ints.shape == (1, 10) and as_ints.dtype == np.float32


def test_no_model_means_503_and_a_runtime_failure_means_500(slots):
    engine = InferenceEngine()
    with pytest.raises(NoActiveModel) as none:
        engine.infer({"input": SAMPLE})
    assert none.value.http_status == 503

    def pre_infer(bundle_id: str) -> None:
        raise RuntimeError("injected: accelerator fell off the bus")

    engine.pre_infer = pre_infer
    engine.swap(*slots["onnx"][:2], bundle_id=slots["onnx"][2])
    with pytest.raises(InferenceFailed) as failed:
        engine.infer({"input": SAMPLE})
    assert failed.value.http_status == 500 and "accelerator fell off the bus" in failed.value.message
    assert failed.value.bundle_id == slots["onnx"][2]


def test_a_failed_load_keeps_the_old_model_serving(engine, slots, tmp_path):
    slot, manifest, bundle_id = slots["onnx"]
    broken = tmp_path / "broken"
    (broken / "model").mkdir(parents=True)
    (broken / "model" / "model.onnx").write_bytes(b"not an onnx model")

    with pytest.raises(Exception, match="onnxruntime cannot load model.onnx"):
        engine.swap(broken, manifest, bundle_id="broken")

    assert engine.active_bundle_id == bundle_id
    assert engine.infer({"input": SAMPLE})["logits"].shape == (1, 10)


def test_observers_see_every_request_and_their_exceptions_never_break_one(engine, slots, caplog):
    seen: list[InferenceEvent] = []

    def broken(event: InferenceEvent) -> None:
        raise ValueError("observer bug")

    engine.add_observer(broken)
    engine.add_observer(seen.append)
    with caplog.at_level(logging.ERROR, logger="device_agent.inference"):
        answers = [engine.infer({"input": SAMPLE}) for _ in range(5)]
        with pytest.raises(InvalidInput):
            engine.infer({"input": SAMPLE.reshape(64)})

    assert len(answers) == 5 and all(a["logits"].shape == (1, 10) for a in answers)
    assert engine.observer_errors == 6
    assert len([r for r in caplog.records if "observer" in r.getMessage()]) == 1  # logged once, counted always
    assert [e.error is None for e in seen] == [True] * 5 + [False]
    ok, refused = seen[0], seen[-1]
    assert ok.bundle_id == slots["onnx"][2] and ok.outputs["logits"].shape == (1, 10) and ok.inputs["input"].shape == (1, 1, 8, 8)
    assert ok.latency_ms > 0 and abs(ok.ts - time.time()) < 60
    assert refused.outputs is None and refused.error_kind == "input" and "shape [64]" in refused.error

    engine.remove_observer(broken)
    engine.infer({"input": SAMPLE})
    assert engine.observer_errors == 6 and len(seen) == 7


def test_a_request_in_flight_during_a_switch_finishes_on_its_model_which_is_freed_afterwards(slots):
    entered, release = threading.Event(), threading.Event()
    first_id = slots["onnx"][2]

    def pre_infer(bundle_id: str) -> None:
        if bundle_id == first_id and not release.is_set():
            entered.set()
            release.wait(10)

    engine = InferenceEngine(pre_infer=pre_infer)
    first_session = weakref.ref(engine.swap(*slots["onnx"][:2], bundle_id=first_id).session)
    answers: list = []
    request = threading.Thread(target=lambda: answers.append(engine.infer_detailed({"input": SAMPLE})))
    request.start()
    assert entered.wait(10)

    second = engine.swap(*slots["onnx_as_tensorrt"][:2], bundle_id=slots["onnx_as_tensorrt"][2])

    assert engine.active_bundle_id == second.bundle_id
    assert engine.infer_detailed({"input": SAMPLE}).bundle_id == second.bundle_id  # new requests: new model
    assert first_session() is not None  # still held by the request in flight
    release.set()
    request.join(10)
    assert answers[0].bundle_id == first_id and answers[0].outputs["logits"].shape == (1, 10)
    assert first_session() is None  # released once its last request returned


def _answered_more(progress, more: int, timeout: float = 30.0) -> None:
    """Until `progress()` grew by `more`: after a switch, requests started on the new model before the next one."""
    target = progress() + more
    deadline = time.monotonic() + timeout
    while progress() < target:
        assert time.monotonic() < deadline, "the clients stopped answering"
        time.sleep(0.001)


def test_switching_20_times_under_load_fails_no_request(slots):
    engine = InferenceEngine()
    ids = {slots[name][2] for name in ("onnx", "onnx_as_tensorrt")}
    engine.swap(*slots["onnx"][:2], bundle_id=slots["onnx"][2])
    expected = engine.infer({"input": SAMPLE})["logits"]
    stop = threading.Event()
    answered: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    served = [0]  # requests answered so far; a lost increment between threads does not matter

    def hammer() -> None:
        mine, bad = [], []
        while not stop.is_set():
            try:
                result = engine.infer_detailed({"input": SAMPLE})
                np.testing.assert_allclose(result.outputs["logits"], expected, rtol=1e-5)
                mine.append(result.bundle_id)
                served[0] += 1
            except BaseException as exc:  # every failure is the test's business
                bad.append(exc)
        with lock:
            answered.extend(mine)
            failures.extend(bad)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for index in range(20):
        name = ("onnx_as_tensorrt", "onnx")[index % 2]
        engine.swap(*slots[name][:2], bundle_id=slots[name][2])
        _answered_more(lambda: served[0], 8)  # 4 clients: at least 4 of the 8 started on this model
    stop.set()
    for thread in threads:
        thread.join(30)

    assert failures == []
    assert len(answered) > 100 and set(answered) == ids
    assert engine.swaps == 21


@pytest.mark.parametrize("runtime", ["openvino", "tflite"])
def test_openvino_and_litert_bundles_are_served_through_their_runtimes(runtime, slots, openvino_slot):
    from device_agent.selftest import check_selftest

    slot, manifest, bundle_id = openvino_slot if runtime == "openvino" else slots["v1"]
    assert manifest.runtime == runtime
    engine = InferenceEngine()

    engine.swap(slot, manifest, bundle_id=bundle_id)
    logits = engine.infer({"input": SAMPLE})["logits"]

    assert check_selftest(slot).passed
    assert logits.shape == (1, 10) and engine.model.runtime == runtime
    if runtime == "openvino":  # the same float model as the onnx bundle
        np.testing.assert_allclose(logits, _bare_logits(slots["onnx"][0], SAMPLE), rtol=1e-4, atol=1e-4)


def test_latency_multiplier_slows_only_the_named_bundle(engine, slots):
    slow = slots["onnx"][2]

    def median_ms() -> float:
        return float(np.median([engine.infer_detailed({"input": SAMPLE}).latency_ms for _ in range(300)]))

    baseline = median_ms()
    engine.latency_multiplier = lambda bundle_id: 20.0 if bundle_id == slow else 1.0
    slowed = median_ms()
    engine.swap(*slots["onnx_as_tensorrt"][:2], bundle_id=slots["onnx_as_tensorrt"][2])
    other = median_ms()

    assert slowed > 5 * baseline, (baseline, slowed)
    assert other < slowed / 3, (other, slowed)


def test_a_device_clock_adds_simulated_compute_to_the_reported_latency_without_waiting_for_it(slots):
    simulated = slots["onnx"][2]
    asked: list[str] = []

    def device_clock(bundle_id: str) -> float:
        asked.append(bundle_id)
        return 500.0 if bundle_id == simulated else 0.0

    seen: list[InferenceEvent] = []
    engine = InferenceEngine(simulated_latency_ms=device_clock)
    engine.add_observer(seen.append)
    engine.swap(*slots["onnx"][:2], bundle_id=simulated)
    started = time.perf_counter()
    results = [engine.infer_detailed({"input": SAMPLE}) for _ in range(10)]
    took_ms = (time.perf_counter() - started) * 1000.0
    with pytest.raises(InvalidInput):  # refused before the runtime: no device compute to simulate
        engine.infer({"input": SAMPLE.reshape(64)})
    engine.swap(*slots["onnx_as_tensorrt"][:2], bundle_id=slots["onnx_as_tensorrt"][2])
    other = engine.infer_detailed({"input": SAMPLE})

    assert took_ms < 500.0, took_ms  # ten requests "of 500 ms" returned at host speed
    real_ms = [r.latency_ms - 500.0 for r in results]
    assert all(0 < ms < took_ms for ms in real_ms), real_ms  # the real inference is still timed, on top
    assert [e.latency_ms for e in seen[:10]] == [r.latency_ms for r in results]  # what telemetry sees
    assert seen[10].error_kind == "input" and seen[10].latency_ms < 500.0
    assert asked == [simulated] * 10 + [slots["onnx_as_tensorrt"][2]]  # once per answered request, with its bundle
    assert 0 < other.latency_ms < 500.0
    engine.close()


# ---------------------------------------------------------------------------------------------------
# HTTP


def test_http_answers_json_npy_and_npz_bodies(server, slots):
    slot, _, bundle_id = slots["onnx"]
    expected = _bare_logits(slot, SAMPLE)

    status, headers, body = _post(server, json.dumps({"inputs": {"input": SAMPLE.tolist()}}).encode(), "application/json")
    assert status == 200, body
    document = json.loads(body)
    assert document["bundle_id"] == bundle_id == headers["X-Edgepack-Bundle"] and document["latency_ms"] > 0
    np.testing.assert_allclose(np.array(document["outputs"]["logits"], np.float32), expected, rtol=1e-6)

    status, headers, body = _post(server, _npy(SAMPLE), "application/x-npy")
    assert status == 200 and headers["Content-Type"] == "application/x-npy", body
    assert headers["X-Edgepack-Bundle"] == bundle_id and float(headers["X-Edgepack-Latency-Ms"]) > 0
    np.testing.assert_allclose(np.load(io.BytesIO(body), allow_pickle=False), expected, rtol=1e-6)

    buffer = io.BytesIO()
    np.savez(buffer, input=SAMPLE)
    status, headers, body = _post(server, buffer.getvalue(), "application/x-npz")
    assert status == 200 and headers["Content-Type"] == "application/x-npz", body
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        np.testing.assert_allclose(archive["logits"], expected, rtol=1e-6)


@pytest.mark.parametrize(("body", "content_type", "status", "message"), [
    (json.dumps({"inputs": {"input": [[1.0, 2.0]]}}).encode(), "application/json", 400,
     "input 'input': shape [1, 2], expected [1, 1, 8, 8]"),
    (json.dumps({"inputs": {"pixels": SAMPLE.tolist()}}).encode(), "application/json", 400, "missing ['input'], unexpected ['pixels']"),
    (json.dumps({"inputs": {"input": "zeros"}}).encode(), "application/json", 400, "input 'input': dtype str"),
    (b"{not json", "application/json", 400, "body is not valid JSON"),
    (json.dumps({"input": SAMPLE.tolist()}).encode(), "application/json", 400, 'body must be a JSON object {"inputs"'),
    (b"not an array", "application/x-npy", 400, "body is not a .npy array"),
    (b"\x93NUMPY\x01\x00\x08\x00garbage!", "application/x-npy", 400, ".npy header not understood"),
    (_npy(SAMPLE)[:-4], "application/x-npy", 400, ".npy data has 252 bytes, its header announces 256"),
    (_npy(np.array(["text"])), "application/x-npy", 400,
     ".npy header not understood"),
    (_npy(SAMPLE.astype(np.float64).reshape(8, 8)), "application/x-npy", 400, "shape [8, 8], expected [1, 1, 8, 8]"),
    (b"PK not a zip", "application/x-npz", 400, "body is not a .npz archive"),
    (b"input=1", "text/plain", 415, "Content-Type text/plain is not served"),
    (b"x" * (64 * 1024 + 1), "application/json", 413, "larger than the 65536 bytes this agent accepts"),
])
def test_http_refuses_bad_requests_with_a_json_reason(server, body, content_type, status, message):
    got_status, headers, raw = _post(server, body, content_type)

    assert got_status == status and headers["Content-Type"] == "application/json"
    assert message in json.loads(raw)["detail"]


def test_health_and_model_routes_follow_the_engine(slots):
    engine = InferenceEngine()
    server = InferenceServer(engine, port=0)
    server.start()
    try:
        assert _get(server, "/healthz") == (503, {"status": "no model", "bundle_id": None})
        status, document = _get(server, "/v1/model")
        assert status == 503 and document["error"] == "NoActiveModel"
        status, _, raw = _post(server, _npy(SAMPLE), "application/x-npy")
        assert status == 503 and "no model is active" in json.loads(raw)["detail"]

        slot, manifest, bundle_id = slots["onnx"]
        engine.swap(slot, manifest, bundle_id=bundle_id)

        assert _get(server, "/healthz") == (200, {"status": "ok", "bundle_id": bundle_id})
        status, document = _get(server, "/v1/model")
        assert status == 200 and document["bundle_id"] == bundle_id and document["runtime"] == "onnxruntime"
        assert document["io"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 1, 8, 8]}]
        assert _get(server, "/nope")[0] == 404
        assert _get(server, "/v1/infer")[0] == 405
    finally:
        server.stop()


def test_http_keeps_answering_through_switches(engine, server, slots):
    ids = {slots[name][2] for name in ("onnx", "onnx_as_tensorrt")}
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    archive = io.BytesIO()
    np.savez(archive, input=SAMPLE)
    bodies = [(_npy(SAMPLE), "application/x-npy"), (archive.getvalue(), "application/x-npz")]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # one keep-alive connection
        sent = 0
        while not stop.is_set():
            body, content_type = bodies[sent % 2]
            sent += 1
            connection.request("POST", "/v1/infer", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            with lock:
                results.append((response.status, response.getheader("X-Edgepack-Bundle")))
        connection.close()

    # Several handler threads parse .npy headers at once (numpy's own parser is not thread-safe on 3.11).
    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for index in range(10):
        name = ("onnx_as_tensorrt", "onnx")[index % 2]
        engine.swap(*slots[name][:2], bundle_id=slots[name][2])
        _answered_more(lambda: len(results), 8)  # 4 clients: at least 4 of the 8 started on this model
    stop.set()
    for thread in threads:
        thread.join(30)

    assert results and {status for status, _ in results} == {200}
    assert {bundle for _, bundle in results} == ids


# ---------------------------------------------------------------------------------------------------
# in the agent


def test_the_agent_serves_every_bundle_it_switches_to_over_python_and_http(tmp_path, bundles, bundle_server, mosquitto):
    from device_agent.agent import Agent
    from edgepack.protocol import DesiredState, encode
    from tests.device_agent.conftest import StatusWatcher, agent_config, publish_desired

    for bundle in (bundles.onnx, bundles.onnx_as_tensorrt):
        bundle_server.add(bundle)
    bundle_server.enrollment_tokens.add("et_inference")
    device_id = f"infer-{secrets.token_hex(3)}"
    config = agent_config(tmp_path, bundles, fleet_url=bundle_server.url, mqtt_url=mosquitto.url, device_id=device_id,
                          enrollment_token="et_inference", selftest_isolation="thread", serve={"port": 0})
    watcher = StatusWatcher(mosquitto.url, device_id)
    agent = Agent(config)
    seen_by_listener: list[str | None] = []
    agent.on_active_change(lambda active: seen_by_listener.append(agent.engine.active_bundle_id))
    agent.start()
    try:
        assert agent.wait_connected(10)
        server = agent.inference_server
        assert server is not None and server.host == "127.0.0.1"
        port = server.port
        assert _get(server, "/healthz")[0] == 503
        with pytest.raises(NoActiveModel):
            agent.infer({"input": SAMPLE})

        for seq, bundle, action in [(1, bundles.onnx, "install"), (2, bundles.onnx_as_tensorrt, "install"),
                                    (3, bundles.onnx, "rollback")]:
            message = DesiredState(rollout_id="r-1", seq=seq, action=action, bundle=bundle.ref if bundle else None)
            publish_desired(mosquitto.url, device_id, encode(message))
            final = watcher.wait_for(lambda s, seq=seq: s.seq == seq and s.phase in ("active", "failed", "rolled_back"), 30)
            assert final.error is None, final.error
            assert agent.engine.active_bundle_id == final.current_bundle
            assert agent.infer({"input": SAMPLE})["logits"].shape == (1, 10)
            assert _get(server, "/healthz") == (200, {"status": "ok", "bundle_id": final.current_bundle})

        assert final.current_bundle == bundles.onnx.ref.id  # rolled back, without a download
        assert seen_by_listener[-3:] == [bundles.onnx.ref.id, bundles.onnx_as_tensorrt.ref.id, bundles.onnx.ref.id]
    finally:
        agent.stop()
        watcher.close()
    with pytest.raises(ConnectionRefusedError):  # stopped with the agent
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/healthz")


def test_an_agent_without_serve_in_its_config_serves_only_python(tmp_path, bundles):
    from device_agent.agent import Agent
    from tests.device_agent.conftest import agent_config

    config = agent_config(tmp_path, bundles, fleet_url="http://127.0.0.1:1")
    disabled = agent_config(tmp_path, bundles, fleet_url="http://127.0.0.1:1", device_id="dev-2", serve={"enabled": False})

    assert config.serve is None and disabled.serve.enabled is False
    for each in (config, disabled):
        agent = Agent(each)
        agent._start_serving()
        assert agent.inference_server is None


def test_a_taken_port_is_one_config_error_naming_the_address(tmp_path, bundles):
    import socket

    from device_agent.agent import Agent
    from edgepack.errors import ConfigError
    from tests.device_agent.conftest import agent_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = Agent(agent_config(tmp_path, bundles, fleet_url="http://127.0.0.1:1", serve={"port": port}))

        with pytest.raises(ConfigError, match=f"cannot serve inference on 127.0.0.1:{port}: Address already in use"):
            agent._start_serving()
