"""Builder fixtures: a tiny real ONNX CNN project."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from testbeds.tiny import float_outputs, make_tiny_cnn


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A project folder with model.onnx, calib.npz, val.npz (labels = the float model's argmax) and edgepack.yaml."""
    model = make_tiny_cnn(tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    calib = rng.random((64, 1, 8, 8), dtype=np.float32)
    val = rng.random((120, 1, 8, 8), dtype=np.float32)
    labels = float_outputs(model, val).argmax(axis=1).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input=calib)
    np.savez(tmp_path / "val.npz", input=val, labels=labels)
    config = {
        "name": "tiny-cnn", "version": "0.1.0", "model": "model.onnx",
        "data": {"calibration": "calib.npz", "validation": "val.npz"},
        "metric": "top1", "gates": {"max_accuracy_drop": 0.05},
        "optimize": {"precisions": ["fp32", "fp16", "int8"]},
        "benchmark": {"warmup": 2, "runs": 10},
    }
    (tmp_path / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path
