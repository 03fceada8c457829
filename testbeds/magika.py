"""A build project for Google's magika file-type model (`magika/models/standard_v3_3/model.onnx`): an
integer-input embedding model, the kind a quantizer meets least often.

    bytes   int32 [N, 2048]   the first 1024 and the last 1024 bytes of a file (after stripping leading and
                              trailing whitespace), each side padded to 1024 with the token 256
    output  float32 [N, 214]  softmax over content types

The files are synthesized from the seed alone, in a few families magika knows (Python source, JSON, CSV,
HTML, random binary, PNG-like headers), so the data is the same on every machine. `val.npz` has no
labels: metric `agreement` compares each variant's top class with the float model's.

    python -m testbeds.magika OUT_DIR [--n-calib 64] [--n-val 128] [--seed 0]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from testbeds.models import magika_model
from testbeds.project import project_main, write_config

SIDE = 1024
PAD = 256


def _file(rng: np.random.Generator, kind: int) -> bytes:
    n = int(rng.integers(200, 6000))
    if kind == 0:
        lines = [f"def f{i}(x):\n    return x * {int(rng.integers(0, 99))} + {i}\n" for i in range(n // 30)]
        return ("import os\n\n" + "".join(lines)).encode()
    if kind == 1:
        return json.dumps({f"k{i}": [int(v) for v in rng.integers(0, 1000, 3)] for i in range(n // 25)}).encode()
    if kind == 2:
        return "\n".join(",".join(str(int(v)) for v in rng.integers(0, 500, 5)) for _ in range(n // 20)).encode()
    if kind == 3:
        body = "".join(f"<p class=\"c{i}\">item {i}</p>\n" for i in range(n // 28))
        return f"<!DOCTYPE html>\n<html><head><title>t</title></head><body>\n{body}</body></html>\n".encode()
    if kind == 4:
        return b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def features(content: bytes) -> np.ndarray:
    content = content.strip()
    begin = list(content[:SIDE]) + [PAD] * (SIDE - len(content[:SIDE]))
    end = list(content[-SIDE:])
    end = [PAD] * (SIDE - len(end)) + end
    return np.asarray(begin + end, dtype=np.int32)


def make_project(out_dir: Path, *, n_calib: int = 64, n_val: int = 128, seed: int = 0) -> Path:
    """Write model.onnx (a copy), calib.npz, val.npz and edgepack.yaml; returns the config's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = np.stack([features(_file(rng, i % 6)) for i in range(n_calib + n_val)])
    np.savez(out_dir / "calib.npz", bytes=samples[:n_calib])
    np.savez(out_dir / "val.npz", bytes=samples[n_calib:])
    (out_dir / "model.onnx").write_bytes(magika_model().read_bytes())
    return write_config(out_dir, name="magika", version="1.0.0", model="model.onnx", inputs={"bytes": [1, 2 * SIDE]},
                        metric="agreement")


def main(argv: list[str] | None = None) -> int:
    return project_main(argv, prog="python -m testbeds.magika", description=__doc__.split("\n\n")[0],
                        make_project=make_project, n_calib=64, n_val=128)


if __name__ == "__main__":
    raise SystemExit(main())
