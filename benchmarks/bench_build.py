"""Build benchmark: float vs INT8, edgepack's INT8 vs plain `quantize_static`, cold build vs cached rebuild.

For each model (examples/digits and the PP-OCR text-direction classifier), in one process on this CPU:
  - fp32 vs edgepack INT8: size ratio, p50 latency ratio, accuracy delta (top-1 on the validation set)
  - plain `onnxruntime.quantization.quantize_static` with default settings on the same calibration data
    (what a user would otherwise do by hand): the same three numbers
  - a cold `edgepack build` vs an unchanged rebuild served from the build cache: time ratio
Numbers are printed, never asserted: this machine is shared and noisy.

    python benchmarks/bench_build.py [--profile x86-avx512-vnni] [--runs 300]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.pipeline import BuildRequest, run_build  # noqa: E402
from edgepack.config import load_build_config  # noqa: E402


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def p50_ms(path: Path, feed: dict, runs: int) -> float:
    session = _session(path)
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def top1(path: Path, inputs: dict[str, np.ndarray], labels: np.ndarray, shape: tuple[int, ...]) -> float:
    session = _session(path)
    name = next(iter(inputs))
    preds = [int(session.run(None, {name: inputs[name][i].reshape(shape)})[0].argmax()) for i in range(len(labels))]
    return float(np.mean(np.asarray(preds) == labels))


def plain_quantize_static(model: Path, calib: dict[str, np.ndarray], shape: tuple[int, ...], out: Path) -> Path:
    from onnxruntime.quantization import quantize_static

    name = next(iter(calib))

    class Reader:
        def __init__(self):
            self._it = iter({name: calib[name][i].reshape(shape)} for i in range(len(calib[name])))

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(model), str(out), Reader())  # every default, as the docs' first example
    return out


def bench(label: str, config_path: Path, profile: str, runs: int, work: Path) -> dict:
    config = load_build_config(config_path)
    cache = work / f"cache-{label}"
    started = time.perf_counter()
    cold = run_build(BuildRequest(config_path=config_path, profile=profile, out_dir=work / f"{label}-cold", cache_dir=cache))
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    warm = run_build(BuildRequest(config_path=config_path, profile=profile, out_dir=work / f"{label}-warm", cache_dir=cache))
    warm_s = time.perf_counter() - started
    report = cold.report
    variants = {v.name: v for v in report.variants}
    (input_name, shape), = [(k, v) for k, v in (config.inputs or {}).items()] or [(None, None)]
    val = np.load(config.validation_path)
    calib = np.load(config.calibration_path)
    labels = val["labels"]
    inputs = {input_name: val[input_name]}
    feed = {input_name: val[input_name][0].reshape(shape)}
    model = config.model_path
    plain = plain_quantize_static(model, {input_name: calib[input_name]}, tuple(shape), work / f"{label}-plain-int8.onnx")
    fp32_size = model.stat().st_size
    ours_path = next(Path(p) for p in (work / f"cache-{label}" / "passes").glob("*/model.onnx")
                     if _sha(p) == variants["int8"].model_sha256)
    fp32_p50 = p50_ms(model, feed, runs)
    ours_p50 = p50_ms(ours_path, feed, runs)
    plain_p50 = p50_ms(plain, feed, runs)
    fp32_acc = top1(model, inputs, labels, tuple(shape))
    return {
        "label": label,
        "profile": report.profile,
        "selected": report.selected,
        "fp32": {"size": fp32_size, "p50": fp32_p50, "acc": fp32_acc},
        "edgepack int8": {"size": ours_path.stat().st_size, "p50": ours_p50, "acc": top1(ours_path, inputs, labels, tuple(shape))},
        "plain quantize_static": {"size": plain.stat().st_size, "p50": plain_p50, "acc": top1(plain, inputs, labels, tuple(shape))},
        "cold_s": cold_s,
        "warm_s": warm_s,
        "warm_cached_passes": sum(p.cached for p in warm.report.passes),
        "passes": len(warm.report.passes),
    }


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="x86-avx512-vnni", help="profile to build for (the host's ISA gives measured selection)")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per latency measurement")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    try:
        from testbeds.ppocr_cls import make_project

        projects = [("digits", REPO / "examples" / "digits" / "edgepack.yaml"),
                    ("ppocr-cls", make_project(work / "ppocr"))]
        rows = [bench(label, path, args.profile, args.runs, work) for label, path in projects]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nedgepack build benchmark — profile {args.profile}, 1 thread, p50 of {args.runs} runs on this CPU\n")
    header = f"{'model':<10} {'variant':<22} {'size KB':>9} {'size/fp32':>9} {'p50 ms':>8} {'p50/fp32':>9} {'top-1':>7} {'Δ points':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row["fp32"]
        for name in ("fp32", "edgepack int8", "plain quantize_static"):
            v = row[name]
            print(f"{row['label']:<10} {name:<22} {v['size'] / 1024:>9.1f} {v['size'] / base['size']:>9.3f} {v['p50']:>8.3f} "
                  f"{v['p50'] / base['p50']:>9.2f} {v['acc']:>7.3f} {(v['acc'] - base['acc']) * 100:>+9.2f}")
        ours, plain = row["edgepack int8"], row["plain quantize_static"]
        print(f"{row['label']:<10} edgepack int8 vs plain: latency {ours['p50'] / plain['p50']:.2f}x, size {ours['size'] / plain['size']:.2f}x, "
              f"accuracy {(ours['acc'] - plain['acc']) * 100:+.2f} points; selected variant: {row['selected']}")
        print(f"{row['label']:<10} cold build {row['cold_s']:.2f} s, cached rebuild {row['warm_s']:.3f} s "
              f"({row['warm_s'] / row['cold_s']:.3f} of cold; {row['warm_cached_passes']}/{row['passes']} passes from cache)\n")


if __name__ == "__main__":
    main()
