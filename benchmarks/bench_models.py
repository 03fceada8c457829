"""Model-zoo benchmark (issue 13): real models that pip packages ship, each built by `edgepack build` as a
new user would, against what the same user gets from onnxruntime's quantizers with their defaults.

The zoo (test material no one here wrote, data made from a seed so every machine sees the same):
  digits      examples/digits: a small CNN, handwritten digits, top-1 on labels
  ppocr-cls   rapidocr's PP-OCR text-direction classifier, rendered text lines, top-1 on labels
  silero-vad  Silero VAD v5 (LSTM), synthetic speech/noise frames, mean abs error of the speech probability
  magika      Google's magika file-type model (int32 bytes), synthetic files, top-1 agreement with float
  minilm      all-MiniLM-L6-v2 (testbeds/minilm.py, converted here from the shipped safetensors), templated
              sentences, cosine with the float embedding

Per model, in one process on this CPU: the cold build's time, the variant it selected, its size / fp32, its
p50 latency / fp32, and its metric delta; the same for plain `quantize_static(model, reader)` and
`quantize_dynamic(model)` with every default (a quantizer that raises is listed with its reason). Latencies
are taken in rounds that visit every model variant in turn (interleaved: a busy host hits all alike), one
thread, batch 1, the median of the rounds' p50s. A selected OpenVINO or LiteRT variant is timed by the
build itself (its report's host p50) and marked so. Numbers are printed, never asserted.

    python benchmarks/bench_models.py [--profile x86-avx512-vnni] [--models digits,ppocr-cls,...] [--rounds 5] [--runs 50]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.pipeline import BuildRequest, run_build  # noqa: E402
from bench_build import p50_ms  # noqa: E402  (same folder: the script's own)
from builder.onnx_utils import make_session  # noqa: E402
from builder.verify import compare, run_model  # noqa: E402
from edgepack.config import load_build_config  # noqa: E402

MODELS = ("digits", "ppocr-cls", "silero-vad", "magika", "minilm")


def make_project(name: str, root: Path) -> Path:
    if name == "digits":
        return REPO / "examples" / "digits" / "edgepack.yaml"
    if name == "ppocr-cls":
        from testbeds.ppocr_cls import make_project as make
    elif name == "silero-vad":
        from testbeds.silero import make_project as make
    elif name == "magika":
        from testbeds.magika import make_project as make
    elif name == "minilm":
        from testbeds.minilm import make_project as make
    else:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    return make(root / name)


def feeds_of(model: Path, npz: Path, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """One feed per sample, batch 1 where the model's input has one more axis than the sample."""
    session = make_session(model)
    data = np.load(npz)
    inputs = {i.name: len(i.shape) for i in session.get_inputs()}
    count = min(len(data[name]) for name in inputs)
    count = count if limit is None else min(count, limit)
    feeds = []
    for index in range(count):
        feed = {}
        for name, rank in inputs.items():
            sample = np.asarray(data[name][index])
            feed[name] = sample[None] if sample.ndim + 1 == rank else sample
        feeds.append(feed)
    return feeds


def plain_static(model: Path, calib: list[dict[str, np.ndarray]], out: Path) -> Path:
    from onnxruntime.quantization import quantize_static

    class Reader:
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(model), str(out), Reader())  # every default, as the docs' first example
    return out


def plain_dynamic(model: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(model), str(out))
    return out


def selected_model(report: Any, work: Path) -> Path | None:
    """The selected variant's ONNX from the bundle, or None when it is not ONNX (timed by the build)."""
    chosen = report.variant(report.selected)
    if chosen.format != "onnx":
        return None
    with tarfile.open(report.bundle.path) as bundle:
        member = next(m for m in bundle.getmembers() if m.name.endswith(".onnx"))
        target = work / f"selected-{chosen.model_sha256[:12]}.onnx"
        with bundle.extractfile(member) as source:
            target.write_bytes(source.read())
    return target


def bench_model(name: str, profile: str, work: Path) -> dict[str, Any]:
    config_path = make_project(name, work / "projects")
    config = load_build_config(config_path)
    started = time.perf_counter()
    result = run_build(BuildRequest(config_path=config_path, profile=profile, out_dir=work / f"{name}-dist",
                                    cache_dir=work / f"{name}-cache"))
    build_s = time.perf_counter() - started
    report = result.report
    model = config.model_path
    val = feeds_of(model, config.validation_path, limit=config.verify.max_samples)
    calib = feeds_of(model, config.calibration_path, limit=config.optimize.calibration.samples)
    labels_key = config.data.labels_key
    with np.load(config.validation_path) as data:
        labels = data[labels_key][:len(val)] if labels_key in data.files else None
    reference = run_model(model, val)
    base_value = compare(reference, reference, labels, config.metric)["accuracy"]
    rows: dict[str, dict[str, Any]] = {"fp32": {"path": model}}
    chosen = report.variant(report.selected) if report.selected else None
    if chosen is not None:
        path = selected_model(report, work)
        rows[f"edgepack: {chosen.name}"] = {"path": path, "report": chosen}
    for label, make in (("quantize_static defaults", lambda: plain_static(model, calib, work / f"{name}-static.onnx")),
                        ("quantize_dynamic defaults", lambda: plain_dynamic(model, work / f"{name}-dynamic.onnx"))):
        try:
            rows[label] = {"path": make()}
        except Exception as exc:  # noqa: BLE001 - a quantizer that raises is a result
            rows[label] = {"path": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"}
    for row in rows.values():
        path = row.get("path")
        if path is not None:
            try:
                row["delta"] = compare(run_model(path, val), reference, labels, config.metric)["accuracy"] - base_value
                row["size"] = path.stat().st_size
            except Exception as exc:  # noqa: BLE001 - onnxruntime refusing a quantized graph is a result too
                row.update(path=None, error=f"does not run: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        elif "report" in row:  # an OpenVINO/LiteRT variant: the build's own numbers
            row["delta"] = row["report"].accuracy_delta
            row["size"] = row["report"].size_bytes
            row["p50"] = row["report"].latency_ms.p50
            row["from_report"] = True
    return {"name": name, "metric": config.metric, "base": base_value, "build_s": build_s, "selected": report.selected,
            "rows": rows, "feed": val[0], "fp32_size": model.stat().st_size, "failed": [f.line() for f in report.failed_variants]}


def time_all(results: list[dict[str, Any]], rounds: int, runs: int) -> None:
    """p50 of every runnable model, in rounds that visit them all in turn; the median over rounds."""
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for result in results:
            for label, row in result["rows"].items():
                if row.get("path") is not None:
                    samples.setdefault((result["name"], label), []).append(p50_ms(row["path"], result["feed"], runs))
    for result in results:
        for label, row in result["rows"].items():
            if (result["name"], label) in samples:
                row["p50"] = statistics.median(samples[(result["name"], label)])


def print_table(results: list[dict[str, Any]], profile: str, rounds: int, runs: int) -> None:
    print(f"\nedgepack model zoo — profile {profile}, 1 thread, batch 1, median of {rounds} interleaved rounds of "
          f"{runs} runs' p50, on this CPU\n")
    header = (f"{'model':<11} {'variant':<30} {'build s':>8} {'size/fp32':>9} {'p50 ms':>8} {'p50/fp32':>9} {'metric':>8} "
              f"{'Δ vs fp32':>9}")
    print(header)
    print("-" * len(header))
    for result in results:
        fp32 = result["rows"]["fp32"]
        for label, row in result["rows"].items():
            build = f"{result['build_s']:.1f}" if label.startswith("edgepack") else ""
            if row.get("error"):
                print(f"{result['name']:<11} {label:<30} {build:>8} {'failed: ' + row['error']}")
                continue
            mark = "*" if row.get("from_report") else ""
            delta = row["delta"]
            print(f"{result['name']:<11} {label:<30} {build:>8} {row['size'] / result['fp32_size']:>9.3f} "
                  f"{row['p50']:>7.3f}{mark:1} {row['p50'] / fp32['p50']:>9.2f} {result['metric']:>8} {delta:>+9.4f}")
        for line in result["failed"]:
            print(f"{result['name']:<11} dropped by the build: {line}")
        print()
    print("* timed by the build in its own runtime (OpenVINO/LiteRT), not in this process's rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="x86-avx512-vnni")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="edgepack-zoo-"))
    try:
        results = []
        for name in args.models.split(","):
            print(f"building {name} …", flush=True)
            results.append(bench_model(name.strip(), args.profile, work))
        time_all(results, args.rounds, args.runs)
        print_table(results, args.profile, args.rounds, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
