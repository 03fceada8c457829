"""Issue 13, INT8 recipes by family and weight compression, on a real transformer: all-MiniLM-L6-v2's first
encoder layer with its real weights (testbeds/minilm.py), built as a user would, inputs pinned to [1, 64].

Before: the simplify step's MatMul+Add fusion made the saved graph unloadable ("Attempt to replace the
existing tensor") and the build exited 2; every-op static INT8 lost 0.06 cosine on one layer (0.47 on six);
MatMul work under dynamic shapes counted as 0 %, so dynamic INT8 was never tried; and the 30522x384
embedding stayed float, holding dynamic INT8 at 0.65x the float size on the whole model."""

from __future__ import annotations

import numpy as np
import pytest

from builder.estimate import count_graph
from builder.family import detect_family
from builder.pipeline import BuildRequest, run_build
from testbeds import minilm, models
from testbeds.tiny import make_tiny_cnn


@pytest.fixture(scope="module")
def minilm_1l(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm1")
    return minilm.make_project(root / "project", layers=1, n_calib=16, n_val=32)


def test_the_family_is_read_from_the_graph(minilm_1l, tmp_path):
    transformer = detect_family(minilm_1l.parent / "model.onnx")
    assert transformer.name == "transformer" and transformer.embedding_share > 0.8  # one layer: mostly the table
    assert transformer.int8_recipe() == {"op_types": ["MatMul", "Gemm"], "matmul_const_b_only": True}
    assert detect_family(models.silero_vad_model()).name == "recurrent"
    tiny = make_tiny_cnn(tmp_path / "tiny.onnx")
    assert detect_family(tiny).name == "conv" and detect_family(tiny).int8_recipe() == {}


def test_matmul_work_is_counted_at_the_data_s_shape_when_the_model_s_dims_are_dynamic(minilm_1l):
    model = minilm_1l.parent / "model.onnx"  # batch and seq are dynamic in the file
    unshaped = count_graph(model)
    shaped = count_graph(model, {"input_ids": (1, 64), "attention_mask": (1, 64)})

    def matmul_share(counts):
        total = sum(n["macs"] for n in counts)
        return sum(n["macs"] for n in counts if n["op_type"] in ("MatMul", "Gemm")) / total if total else 0.0

    assert matmul_share(unshaped) == 0.0
    assert matmul_share(shaped) > 0.9
    # a query projection: 64 tokens x 384 x 384
    assert next(n["macs"] for n in shaped if n["name"] == "layer.0.attention.query") == 64 * 384 * 384


def test_minilm_builds_with_the_transformer_recipe_and_a_quarter_of_its_float_size(minilm_1l, tmp_path):
    result = run_build(BuildRequest(config_path=minilm_1l, profile="x86-avx512-vnni", out_dir=tmp_path / "out"))

    report = result.report
    assert result.exit_code == 0 and report.selected
    assert report.model_family is not None and report.model_family.name == "transformer"
    assert any(n.startswith("model family: transformer") and "embedding tables" in n for n in report.notes)
    int8 = report.variant("int8")  # static: weight MatMuls only, per channel
    assert int8.quantization["op_types"] == ["MatMul", "Gemm"] and int8.quantization["matmul_const_b_only"] is True
    assert int8.passed and int8.accuracy_delta >= -0.02
    dynamic = report.variant("int8-dynamic")  # embedding table included
    assert "Gather" in dynamic.quantization["op_types"]
    assert dynamic.passed and dynamic.size_ratio <= 0.30 and dynamic.accuracy_delta >= -0.02
    selected = report.variant(report.selected)
    assert selected.precision == "int8" and selected.passed
    assert np.isfinite(selected.latency_ms.p50)
