"""The OpenVINO target: real OpenVINO runtime and real NNCF on tiny models and the digits example."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

import builder.targets.openvino as openvino_target
from builder.data import load_build_data
from builder.passes.base import PassContext, load_all_passes
from builder.pipeline import BuildRequest, run_build
from builder.runtimes import get_adapter
from builder.verify import compare, run_model
from edgepack.bundle import open_bundle
from edgepack.config import load_build_config
from edgepack.errors import ConfigError, EdgepackError
from edgepack.signing import generate_keypair, load_public_key
from hardware_profiles import load_profile
from testbeds.tiny import write_config

from tests.support import REPO

DIGITS = REPO / "examples" / "digits"
PASSES = load_all_passes()


def _context(project_config: Path, work_dir: Path, shapes: dict[str, tuple[int, ...]]) -> PassContext:
    config = load_build_config(project_config)
    data = load_build_data(config.calibration_path, config.validation_path)
    data.check_against(shapes, {name: np.dtype(np.float32) for name in shapes})
    return PassContext(work_dir=work_dir, profile=load_profile("intel-nuc"), build=config, data=data)


def _convert(model: Path, ctx: PassContext):
    return PASSES["ov-convert"].from_dict({}).run(model, ctx)


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(tmp_path / "keys")


def _openvino_only_profile(tmp_path: Path) -> Path:
    """intel-nuc with OpenVINO as its only runtime, so an OpenVINO variant must ship."""
    profile = yaml.safe_load((REPO / "hardware_profiles" / "intel-nuc.yaml").read_text())
    profile.update(name="intel-nuc-openvino", aliases=[], runtimes=[r for r in profile["runtimes"] if r["name"] == "openvino"])
    path = tmp_path / "intel-nuc-openvino.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


# ---------------------------------------------------------------- passes and adapter


def test_fp32_ir_runs_in_openvino_like_the_onnx_in_onnxruntime(tiny_project, tmp_path):
    ctx = _context(tiny_project / "edgepack.yaml", tmp_path / "work", {"input": (1, 1, 8, 8)})
    feeds = list(ctx.data.feeds("validation", limit=40))

    result = _convert(tiny_project / "model.onnx", ctx)

    assert result.model_path.suffix == ".xml" and result.sidecars == [result.model_path.with_suffix(".bin")]
    assert result.sidecars[0].stat().st_size > 0
    adapter = get_adapter("openvino")
    ours = adapter.run(result.model_path, feeds)
    reference = run_model(tiny_project / "model.onnx", feeds)
    assert list(ours.arrays) == ["logits"] and ours.first.shape == reference.first.shape == (40, 1, 4)
    assert np.abs(ours.first - reference.first).max() < 1e-4
    latency = adapter.latency(result.model_path, feeds[0], warmup=2, runs=5, threads=1)
    assert set(latency) == {"p50", "p95", "mean", "runs", "threads"} and 0 < latency["p50"] <= latency["p95"]
    assert adapter.versions()["openvino"]


def test_fp16_ir_halves_the_weights_and_stays_close(tiny_project, tmp_path):
    ctx = _context(tiny_project / "edgepack.yaml", tmp_path / "work", {"input": (1, 1, 8, 8)})
    feeds = list(ctx.data.feeds("validation", limit=40))
    fp32 = _convert(tiny_project / "model.onnx", ctx)

    fp16 = PASSES["ov-fp16"].from_dict({}).run(fp32.model_path, ctx)

    assert fp16.sidecars[0].stat().st_size < 0.6 * fp32.sidecars[0].stat().st_size
    adapter = get_adapter("openvino")
    metrics = compare(adapter.run(fp16.model_path, feeds), adapter.run(fp32.model_path, feeds), None, "agreement")
    assert metrics["agreement"] == 1.0 and metrics["cosine"] > 0.9999 and metrics["max_abs_error"] < 1e-2


def test_int8_ir_of_digits_is_quantized_and_keeps_top1(tmp_path):
    ctx = _context(DIGITS / "edgepack.yaml", tmp_path / "work", {"input": (1, 1, 8, 8)})
    feeds = list(ctx.data.feeds("validation"))
    labels = ctx.data.validation.labels
    fp32 = _convert(DIGITS / "model.onnx", ctx)

    int8 = PASSES["ov-int8"].from_dict({"subset_size": 128}).run(fp32.model_path, ctx)

    xml = int8.model_path.read_text()
    assert 'type="FakeQuantize"' in xml and int8.info["quantized_nodes"] > 0
    assert int8.info["quantization"]["format"] == "nncf" and int8.info["quantization"]["accuracy_control"] is False
    assert int8.info["quantization"]["subset_size"] == 128
    assert int8.sidecars[0].stat().st_size < 0.5 * fp32.sidecars[0].stat().st_size
    adapter = get_adapter("openvino")
    reference = adapter.run(fp32.model_path, feeds)
    fp32_top1 = compare(reference, reference, labels, "top1")["accuracy"]
    int8_top1 = compare(adapter.run(int8.model_path, feeds), reference, labels, "top1")["accuracy"]
    assert fp32_top1 > 0.95 and abs(int8_top1 - fp32_top1) <= 0.01


def _layer_names(xml: Path) -> list[str]:
    return [layer.get("name", "") for layer in ElementTree.parse(xml).getroot().iter("layer")]


def test_ir_bytes_keep_onnx_names_and_number_openvinos_own_in_graph_order(tiny_project, tmp_path):
    # Old PyTorch exports name nodes the way OpenVINO's counter does (Conv_0, Relu_1): those names stay.
    model = onnx.load(str(tiny_project / "model.onnx"))
    for index, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{index}"
    onnx.save(model, str(tmp_path / "torch-style.onnx"))
    irs = []
    for run in ("first", "second"):  # the second conversion finds OpenVINO's node counter further on
        ctx = _context(tiny_project / "edgepack.yaml", tmp_path / run, {"input": (1, 1, 8, 8)})
        irs.append(_convert(tmp_path / "torch-style.onnx", ctx))

    first, second = irs
    assert first.model_path.read_bytes() == second.model_path.read_bytes()
    assert first.sidecars[0].read_bytes() == second.sidecars[0].read_bytes()
    names = _layer_names(first.model_path)
    assert {"Conv_0/WithoutBiases", "Relu_1", "Relu_3", "Gemm_6/WithoutBiases"} <= set(names)
    counter_like = [n for n in names if re.fullmatch(r"[A-Z][A-Za-z0-9]*_\d+", n)]
    assert set(counter_like) <= {node.name for node in model.graph.node}, counter_like
    assert any("#" in name for name in names), "OpenVINO named some folded constants itself"
    assert '<input_model value="DIR/model.onnx" />' in first.model_path.read_text()


def test_int8_config_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="max_drop only applies with accuracy_control"):
        PASSES["ov-int8"].from_dict({"max_drop": 0.01})
    with pytest.raises(ConfigError, match="accuracy_control needs max_drop"):
        PASSES["ov-int8"].from_dict({"accuracy_control": True})
    with pytest.raises(ConfigError, match="preset"):
        PASSES["ov-int8"].from_dict({"preset": "fast"})
    assert PASSES["ov-int8"].from_dict({"accuracy_control": True, "max_drop": 0.01}).uses_validation_data
    assert not PASSES["ov-int8"].from_dict({}).uses_validation_data


# ---------------------------------------------------------------- through the builder


def test_accuracy_control_runs_when_plain_int8_misses_a_tight_budget(tiny_project, tmp_path, monkeypatch):
    # Cosine similarity with fp32 loses ~1e-4 under plain INT8 on this model: a 2e-5 budget is missed.
    write_config(tiny_project, metric="cosine", gates={"max_accuracy_drop": 2e-5})
    monkeypatch.chdir(tmp_path)  # NNCF in debug mode would drop graphs into ./nncf_debug

    result = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="intel-nuc", out_dir=tmp_path / "out"))

    report = result.report
    ov_int8 = next(v for v in report.variants if v.name == "ov-int8")
    quantization = ov_int8.quantization
    assert quantization["accuracy_control"] is True and quantization["format"] == "nncf"
    assert quantization["plain_drop_vs_ov_fp32"] > 2e-5
    assert quantization["fake_quantize_ops_after"] < quantization["fake_quantize_ops_before"]
    assert ov_int8.fallback_nodes, "the ops NNCF kept in float are listed"
    note = next(n for n in report.notes if n.startswith("ov-int8: plain INT8 lost"))
    if ov_int8.accuracy_delta >= -2e-5 - 1e-9:
        assert "within budget" in note and ov_int8.passed
    else:  # the report says why it still misses
        assert "still over budget" in note and any(g.gate == "max_accuracy_drop" for g in ov_int8.failed_gates)
    assert any(p.name == "ov-int8 accuracy-control" and p.pass_name == "ov-int8" for p in report.passes)
    assert not (tmp_path / "nncf_debug").exists()


def test_digits_for_intel_nuc_verifies_openvino_variants_in_openvino(tmp_path, keys):
    private, public = keys

    result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile="intel-nuc", out_dir=tmp_path / "out",
                                    signing_key=private))

    report = result.report
    assert result.exit_code == 0 and report.selected
    openvino = {v.name: v for v in report.variants if v.runtime == "openvino"}
    assert set(openvino) == {"ov-fp32", "ov-fp16", "ov-int8"}
    for variant in openvino.values():
        assert variant.verified_in == "openvino" and variant.format == "openvino-ir"
        assert abs(variant.accuracy_delta) <= 0.005 and variant.passed
    assert openvino["ov-int8"].quantization["accuracy_control"] is False
    assert openvino["ov-int8"].size_bytes < 0.5 * openvino["ov-fp32"].size_bytes
    bundle = open_bundle(Path(report.bundle.path), [load_public_key(public)])
    selected = next(v for v in report.variants if v.name == report.selected)
    if selected.runtime == "openvino":
        assert {"model/model.xml", "model/model.bin"} <= set(bundle.members)
    else:
        assert "model/model.onnx" in bundle.members
    assert bundle.manifest.runtime == selected.runtime


def test_openvino_only_board_ships_an_ir_whose_selftest_passes_in_openvino(tmp_path, keys):
    private, public = keys
    profile = _openvino_only_profile(tmp_path)

    result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile=str(profile), out_dir=tmp_path / "out",
                                    signing_key=private))

    report = result.report
    assert result.exit_code == 0 and report.selected.startswith("ov-") and report.runtime == "openvino"
    bundle = open_bundle(Path(report.bundle.path), [load_public_key(public)])
    assert {"model/model.xml", "model/model.bin"} <= set(bundle.members)
    assert bundle.manifest.model == "model/model.xml" and bundle.manifest.model_format == "openvino-ir"
    assert bundle.manifest.model_files == ["model/model.bin", "model/model.xml"]
    unpacked = bundle.extract(tmp_path / "unpacked")
    selftest = json.loads((unpacked / "selftest" / "cases.json").read_text())
    adapter = get_adapter("openvino")
    for case in selftest["cases"]:
        feed = {name: np.load(unpacked / member) for name, member in case["inputs"].items()}
        actual = adapter.run(unpacked / "model" / "model.xml", [feed])
        for (name, member), value in zip(case["outputs"].items(), actual.arrays.values()):
            expected = np.load(unpacked / member)
            tolerance = selftest["tolerance"]["atol"] + selftest["tolerance"]["rtol"] * np.abs(expected)
            assert np.all(np.abs(value[0].reshape(expected.shape) - expected) <= tolerance), name


def test_openvino_bundle_bytes_depend_only_on_the_inputs(tiny_project, tmp_path, keys):
    # OpenVINO numbers the nodes it names from a process-wide counter, and an IR records its source
    # file (the cache's model.onnx, simplified.onnx without the cache): neither may reach the bundle.
    private, _ = keys
    profile = str(_openvino_only_profile(tmp_path))

    def build(profile: str, name: str, **options) -> Path:
        request = BuildRequest(config_path=tiny_project / "edgepack.yaml", profile=profile, out_dir=tmp_path / name,
                               signing_key=private, **options)
        result = run_build(request)
        assert result.exit_code == 0
        return Path(result.report.bundle.path)

    first = build(profile, "first", cache_dir=tmp_path / "cache-first")
    build("x86-avx2", "other", cache_dir=tmp_path / "cache-other")  # its OpenVINO passes move the counter on
    again = build(profile, "again", cache_dir=tmp_path / "cache-again")
    uncached = build(profile, "uncached", use_cache=False)

    assert again.read_bytes() == first.read_bytes()
    assert uncached.read_bytes() == first.read_bytes()
    unpacked = open_bundle(first, [load_public_key(keys[1])]).extract(tmp_path / "unpacked")
    names = _layer_names(unpacked / "model" / "model.xml")
    assert any("#" in name for name in names), "the shipped IR had nodes OpenVINO named itself"


def test_without_openvino_the_build_notes_it_and_ships_onnx(tiny_project, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_target, "missing_packages", lambda: ["openvino", "nncf"])

    result = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="intel-nuc", out_dir=tmp_path / "out"))

    assert result.exit_code == 0 and all(v.runtime == "onnxruntime" for v in result.report.variants)
    assert any("openvino variants skipped" in n and "edgepack[openvino]" in n for n in result.report.notes)


def test_without_openvino_an_openvino_only_board_fails_before_building(tiny_project, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_target, "missing_packages", lambda: ["openvino", "nncf"])
    out = tmp_path / "out"

    with pytest.raises(EdgepackError, match=r"pip install 'edgepack\[openvino\]'"):
        run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile=str(_openvino_only_profile(tmp_path)), out_dir=out))
    assert not out.exists()
