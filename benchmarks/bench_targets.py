"""Target benchmark: INT8 vs float in each runtime, for the same models, in one run on this CPU.

For examples/digits and the PP-OCR text-direction classifier:
  - onnxruntime INT8 (Q/DQ) vs fp32            (profile x86-avx512-vnni)
  - OpenVINO INT8 (NNCF) IR vs fp32 IR          (profile intel-nuc)
  - LiteRT full-integer vs float32 .tflite      (profile rpi5)
printing p50 latency ratios (1 thread, measured by the builder in each runtime on this host), sizes and
top-1 deltas. Numbers are printed, never asserted.

    python benchmarks/bench_targets.py [--runs 200]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.pipeline import BuildRequest, run_build  # noqa: E402
from edgepack.errors import EdgepackError  # noqa: E402

PAIRS = [
    ("onnxruntime", "x86-avx512-vnni", "fp32", "int8"),
    ("openvino", "intel-nuc", "ov-fp32", "ov-int8"),
    ("litert", "rpi5", "tflite-fp32", "tflite-full-int8"),
]


def _with_runs(config: Path, runs: int, work: Path) -> Path:
    """A copy of the config with the benchmark's run count (paths made absolute)."""
    data = yaml.safe_load(config.read_text())
    base = config.parent.resolve()
    data["model"] = str((base / data["model"]).resolve()) if not Path(data["model"]).is_absolute() else data["model"]
    for key in ("calibration", "validation"):
        value = data.get("data", {}).get(key)
        if value and not Path(value).is_absolute():
            data["data"][key] = str((base / value).resolve())
    data["benchmark"] = {"warmup": 20, "runs": runs, "threads": 1}
    out = work / f"{config.parent.name}-{data['name']}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-targets-"))
    rows = []
    try:
        from testbeds.ppocr_cls import make_project

        models = [("digits", _with_runs(REPO / "examples" / "digits" / "edgepack.yaml", args.runs, work)),
                  ("ppocr-cls", _with_runs(make_project(work / "ppocr"), args.runs, work))]
        for label, config in models:
            for runtime, profile, float_name, int8_name in PAIRS:
                try:
                    result = run_build(BuildRequest(config_path=config, profile=profile, out_dir=work / f"{label}-{profile}",
                                                    cache_dir=work / "cache"))
                except EdgepackError as exc:
                    rows.append((label, runtime, None, None, f"build failed: {exc.message}"))
                    continue
                variants = {v.name: v for v in result.report.variants}
                missing = [n for n in (float_name, int8_name) if n not in variants]
                if missing:
                    notes = "; ".join(n for n in result.report.notes if runtime in n.lower() or "tflite" in n.lower() or "openvino" in n.lower())
                    rows.append((label, runtime, None, None, f"no {', '.join(missing)} variant ({notes or 'see report'})"))
                    continue
                rows.append((label, runtime, variants[float_name], variants[int8_name], result.report.selected))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nedgepack target benchmark — 1 thread, p50 of {args.runs} runs per variant, in each variant's own runtime on this CPU\n")
    header = f"{'model':<10} {'runtime':<12} {'fp32 p50':>9} {'int8 p50':>9} {'int8/fp32':>9} {'fp32 KB':>8} {'int8 KB':>8} {'size':>6} {'Δ top-1':>8}  selected"
    print(header)
    print("-" * len(header))
    for label, runtime, fp32, int8, extra in rows:
        if fp32 is None:
            print(f"{label:<10} {runtime:<12} {extra}")
            continue
        ratio = int8.latency_ms.p50 / fp32.latency_ms.p50
        size = int8.size_bytes / fp32.size_bytes
        delta = (int8.accuracy - fp32.accuracy) * 100
        print(f"{label:<10} {runtime:<12} {fp32['latency_ms']['p50']:>9.3f} {int8['latency_ms']['p50']:>9.3f} {ratio:>9.2f} "
              f"{fp32['size_bytes'] / 1024:>8.1f} {int8['size_bytes'] / 1024:>8.1f} {size:>6.2f} {delta:>+8.2f}  {extra}")


if __name__ == "__main__":
    main()
