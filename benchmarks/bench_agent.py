"""Agent inference benchmark: the agent's Python API and HTTP paths against a bare onnxruntime session.

In one run, for the same model and the same input:
  - examples/digits (1x1x8x8, ~20 µs a run) and the PP-OCR text-direction classifier (1x3x48x192,
    the ONNX that testbeds.ppocr_cls builds from)
  - a bare `onnxruntime.InferenceSession` with the options and providers the agent's adapter uses
  - the agent's Python API: `InferenceEngine.infer` with no observer and with one cheap observer, and
    `Agent.infer` of a real (unstarted) Agent, whose engine carries telemetry, safety and shadow observers
  - HTTP on loopback, JSON and npy bodies, one keep-alive connection
Throughput (requests/s) with 1 and 2 client threads and p50 latency (of the 1-thread burst). Every
round measures every path in a rotating order; ratios to bare are taken within a round and the
median over rounds is printed, so a busy host that slows neighbouring bursts alike leaves the ratios
honest. The HTTP overhead is the HTTP path's p50 minus the Python API's p50 in the same round.
Target: the Python API at >= 0.9x bare throughput. Numbers are printed, never asserted.

    python benchmarks/bench_agent.py [--seconds 0.3] [--rounds 15] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_agent.http_server import InferenceServer  # noqa: E402
from device_agent.inference import InferenceEngine  # noqa: E402
from device_agent.runtimes import OnnxRuntimeAdapter  # noqa: E402
from edgepack.manifest import BundleManifest  # noqa: E402


def _slot(work: Path, name: str, source: Path, fixed_input: list[int] | None) -> tuple[Path, BundleManifest]:
    """A folder laid out like an installed slot (model/model.onnx + manifest io) around `source`."""
    import onnx

    from builder.onnx_utils import io_signature

    slot = work / name
    (slot / "model").mkdir(parents=True)
    (slot / "model" / "model.onnx").write_bytes(source.read_bytes())
    signature = io_signature(onnx.load(str(source)))
    if fixed_input is not None:  # the builder fixes the input shape from the project config the same way
        signature["inputs"][0]["shape"] = fixed_input
    from edgepack.bundle import canonical_json
    from edgepack.files import file_sha256_size
    from edgepack.manifest import BUNDLE_FORMAT, parse_manifest
    from tests.edgepack.samples import manifest_content

    digest, size = file_sha256_size(slot / "model" / "model.onnx")
    manifest = parse_manifest({**manifest_content(name=name, version="bench", io=signature), "format": BUNDLE_FORMAT,
                               "files": {"model/model.onnx": {"sha256": digest, "size": size}}})
    (slot / "manifest.json").write_bytes(canonical_json(manifest.to_json_dict()))
    return slot, manifest


def _models(work: Path) -> list[tuple[str, Path, BundleManifest, dict[str, np.ndarray]]]:
    from testbeds.models import ppocr_cls_model
    from testbeds.ppocr_cls import make_dataset

    rng = np.random.default_rng(0)
    digits_slot, digits_manifest = _slot(work, "digits", REPO / "examples" / "digits" / "model.onnx", None)
    digits_feed = {"input": rng.random((1, 1, 8, 8), dtype=np.float32)}
    ppocr_slot, ppocr_manifest = _slot(work, "ppocr-cls", ppocr_cls_model(), [1, 3, 48, 192])
    ppocr_x, _ = make_dataset(1, seed=1)
    return [("digits", digits_slot, digits_manifest, digits_feed),
            ("ppocr-cls", ppocr_slot, ppocr_manifest, {"x": ppocr_x[:1]})]


# ---------------------------------------------------------------------------------------------------
# measuring


def _burst(call: Callable[[], object], threads: int, seconds: float) -> tuple[float, float]:
    """(requests/s, p50 ms) with `threads` threads calling `call` back to back for `seconds`."""
    timings: list[list[float]] = [[] for _ in range(threads)]
    start_line = threading.Barrier(threads + 1)
    stop = threading.Event()
    clock = time.perf_counter

    def worker(index: int) -> None:
        mine = timings[index]
        start_line.wait()
        while not stop.is_set():
            started = clock()
            call()
            mine.append(clock() - started)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for each in workers:
        each.start()
    start_line.wait()
    started = clock()
    time.sleep(seconds)
    stop.set()
    for each in workers:
        each.join()
    elapsed = clock() - started
    every = [t for mine in timings for t in mine]
    return len(every) / elapsed, statistics.median(every) * 1000.0


class _HttpClient:
    """One keep-alive connection per thread, as a local client would hold."""

    def __init__(self, port: int, body: bytes, content_type: str) -> None:
        self.port, self.body, self.content_type = port, body, content_type
        self._local = threading.local()

    def __call__(self) -> bytes:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            connection.connect()
            # As urllib3/requests do: http.client writes headers and body separately, and with Nagle on
            # the body would wait for the server's delayed ACK of the headers.
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.request("POST", "/v1/infer", body=self.body, headers={"Content-Type": self.content_type})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        return data


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _full_agent(work: Path):
    """A real `Agent` (not started: no broker needed) with every observer the agent wires into its engine."""
    from device_agent.agent import Agent
    from device_agent.config import AgentConfig
    from edgepack.signing import generate_keypair

    keys = work / "keys"
    if not keys.exists():
        generate_keypair(keys)
    config = AgentConfig.from_mapping({
        "device_id": f"bench-{len(list(work.glob('agent-*')))}", "profile": "x86-avx2", "fleet_url": "http://127.0.0.1:9",
        "mqtt_url": "mqtt://127.0.0.1:9", "state_dir": str(work / f"agent-{len(list(work.glob('agent-*')))}"),
        "trusted_keys": [str(keys / "edgepack.pub")]})
    return Agent(config)


def bench_model(name: str, slot: Path, manifest: dict, feed: dict[str, np.ndarray], *, seconds: float, rounds: int,
                work: Path) -> dict:
    import onnxruntime

    adapter = OnnxRuntimeAdapter()
    bare = onnxruntime.InferenceSession(str(slot / "model" / "model.onnx"), sess_options=adapter.session_options(),
                                        providers=adapter.providers(manifest))
    engine = InferenceEngine()
    engine.swap(slot, manifest, bundle_id=f"{name}-bench")
    observed = InferenceEngine()
    observed.swap(slot, manifest, bundle_id=f"{name}-bench")
    counter = [0]
    observed.add_observer(lambda event: counter.__setitem__(0, counter[0] + 1))
    server = InferenceServer(engine, port=0, max_body_bytes=64 << 20)
    server.start()
    (only_input, array), = feed.items()
    paths: dict[str, Callable[[], object]] = {
        "bare onnxruntime": lambda: bare.run(None, feed),
        "agent API": lambda: engine.infer(feed),
        "agent API + observer": lambda: observed.infer(feed),
    }
    try:
        agent = _full_agent(work)
        agent.engine.swap(slot, manifest, bundle_id=f"{name}-bench")
        paths["Agent.infer (all obs.)"] = lambda: agent.infer(feed)
    except Exception as exc:  # the agent's other features are optional here: say why the row is missing
        print(f"note: no Agent.infer row for {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    paths |= {
        "HTTP JSON": _HttpClient(server.port, json.dumps({"inputs": {only_input: array.tolist()}}).encode(), "application/json"),
        "HTTP npy": _HttpClient(server.port, _npy(array), "application/x-npy"),
    }
    np.testing.assert_allclose(engine.infer(feed)[bare.get_outputs()[0].name], bare.run(None, feed)[0], rtol=1e-6)
    for call in paths.values():  # warm up every path (connections, allocator, thread pools)
        for _ in range(20):
            call()
    # Each round measures every path once, in a rotating order, and each path's ratio to bare is taken
    # within its round: a busy host slows neighbouring bursts alike, so the paired ratios stay honest
    # where absolute numbers drift.
    names = list(paths)
    samples: dict[str, dict[str, list[float]]] = {path: {key: [] for key in ("rps1", "rps2", "p50", "x1", "x2", "xp50")}
                                                  for path in paths}
    try:
        for round_index in range(rounds):
            measured = {}
            for path in names[round_index % len(names):] + names[:round_index % len(names)]:
                rps1, p50 = _burst(paths[path], 1, seconds)
                rps2, _ = _burst(paths[path], 2, seconds)
                measured[path] = (rps1, rps2, p50)
            bare_rps1, bare_rps2, bare_p50 = measured["bare onnxruntime"]
            api_p50 = measured["agent API"][2]
            for path, (rps1, rps2, p50) in measured.items():
                row = samples[path]
                row["rps1"].append(rps1)
                row["rps2"].append(rps2)
                row["p50"].append(p50)
                row["x1"].append(rps1 / bare_rps1)
                row["x2"].append(rps2 / bare_rps2)
                row["xp50"].append(p50 / bare_p50)
                row.setdefault("http_overhead_ms", []).append(p50 - api_p50)
    finally:
        server.stop()
        engine.close()
        observed.close()
    return {path: {key: statistics.median(values) for key, values in measured.items()} for path, measured in samples.items()}


# ---------------------------------------------------------------------------------------------------
# report


def _table(results: dict[str, dict]) -> str:
    lines = [f"{'model':<10} {'path':<23} {'req/s 1T':>9} {'req/s 2T':>9} {'p50 ms':>8} "
             f"{'1T vs bare':>11} {'2T vs bare':>11} {'p50 vs bare':>12} {'HTTP overhead/req vs API':>25}"]
    for model, paths in results.items():
        for path, row in paths.items():
            overhead = f"+{row['http_overhead_ms']:.3f} ms" if path.startswith("HTTP") else ""
            lines.append(f"{model:<10} {path:<23} {row['rps1']:>9.0f} {row['rps2']:>9.0f} {row['p50']:>8.4f} "
                         f"{row['x1']:>10.2f}x {row['x2']:>10.2f}x {row['xp50']:>11.2f}x {overhead:>25}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one burst (one path, one thread count)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON after the table")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="edgepack-bench-agent-") as work:
        results = {name: bench_model(name, slot, manifest, feed, seconds=args.seconds, rounds=args.rounds, work=Path(work))
                   for name, slot, manifest, feed in _models(Path(work))}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs (load {load:.1f}), CPUExecutionProvider with the "
          f"agent's session options; medians of {args.rounds} interleaved rounds of {args.seconds:g} s bursts")
    print(_table(results))
    verdicts = [f"{model} {paths['agent API'][key]:.2f}x {'ok' if paths['agent API'][key] >= 0.9 else 'BELOW'} ({threads})"
                for model, paths in results.items() for key, threads in (("x1", "1 thread"), ("x2", "2 threads"))]
    print("Python API throughput vs bare (target >= 0.90x): " + ", ".join(verdicts))
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
