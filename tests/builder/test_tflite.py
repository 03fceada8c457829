"""TFLite / LiteRT target with real onnx2tf conversions and real LiteRT interpreters, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from builder.passes.base import PassContext, load_all_passes
from builder.passes.tflite.onnx2tf_runner import BLOCKED_MARK, SAMPLE_FILE_PREFIX
from builder.pipeline import BuildRequest, run_build
from edgepack.bundle import open_bundle
from edgepack.signing import generate_keypair, load_public_key
from tests.support import REPO

DIGITS = REPO / "examples" / "digits"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cache for the module: rpi5 and coral share the digits conversion, as profiles do."""
    root = tmp_path_factory.mktemp("tflite")
    private, public = generate_keypair(root / "keys")
    return {"cache": root / "cache", "private": private, "public": public}


def _assert_offline(log_text: str, *folders: Path) -> None:
    assert BLOCKED_MARK not in log_text  # no connection was even attempted
    assert "asked for its sample image data" not in log_text
    assert SAMPLE_FILE_PREFIX not in log_text
    for folder in folders:
        assert not list(folder.rglob(f"{SAMPLE_FILE_PREFIX}*"))


def test_digits_for_rpi5_builds_every_tflite_variant_and_verifies_it_in_litert(tmp_path, shared):
    out = tmp_path / "out"
    result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile="rpi5", out_dir=out,
                                    cache_dir=shared["cache"], signing_key=shared["private"]))

    assert result.exit_code == 0
    variants = {v.name: v for v in result.report.variants}
    tflite = {name: v for name, v in variants.items() if v.runtime == "tflite"}
    assert set(tflite) == {"tflite-fp32", "tflite-fp16", "tflite-dynamic-int8", "tflite-full-int8"}
    assert all(v.verified_in == "tflite" and v.format == "tflite" for v in tflite.values())
    # The 4-D NCHW input reaches LiteRT in the right layout: the float32 model agrees with ONNX fp32.
    assert tflite["tflite-fp32"].agreement == 1.0 and tflite["tflite-fp32"].cosine > 0.9999
    full = tflite["tflite-full-int8"]
    assert full.precision == "int8"
    io = full.io_quantization
    assert [t.dtype for t in io.inputs + io.outputs] == ["int8", "int8"]
    assert all(t.scale > 0 for t in io.inputs + io.outputs)
    assert abs(full.accuracy - tflite["tflite-fp32"].accuracy) <= 0.005
    assert full.size_bytes <= 0.35 * tflite["tflite-fp32"].size_bytes
    log = out / "digits-cnn-1.0.0-rpi5.onnx2tf.log"
    assert full.converter["tool"] == "onnx2tf" and "custom_input_op_name_np_data_path" in full.converter["calibration"]
    _assert_offline(log.read_text(), out, REPO, shared["cache"])


def test_coral_ships_the_full_int8_tflite_with_its_edgetpu_placement_and_compiler_command(tmp_path, shared):
    out = tmp_path / "out"
    result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile="coral-devboard", out_dir=out,
                                    cache_dir=shared["cache"], signing_key=shared["private"]))

    report = result.report
    assert result.exit_code == 0
    tflite = [v for v in report.variants if v.runtime == "tflite"]
    assert [v.name for v in tflite] == ["tflite-full-int8"]  # the Edge TPU runs full-integer models only
    assert report.selected == "tflite-full-int8"
    placement = tflite[0].edgetpu
    assert placement["compiler_command"] == "edgetpu_compiler -s -o edgetpu model/model.tflite"
    assert "edgetpu_compiler" in placement["note"] and placement["int8_only"]["ok"]
    assert placement["tpu_ops"] + placement["cpu_ops"] == len(placement["placement"]) > 0
    assert {"Conv2d", "MaxPool2d", "FullyConnected"} <= set(placement["supported_ops"])
    assert any("edgetpu_compiler -s -o edgetpu model/model.tflite" in note for note in report.notes)
    bundle = open_bundle(Path(report.bundle.path), [load_public_key(shared["public"])])
    assert "model/model.tflite" in bundle.members
    manifest = bundle.manifest
    assert manifest.runtime == "tflite" and manifest.delegates == ["edgetpu"]
    assert manifest.io_quantization.inputs[0].dtype == "int8"
    assert manifest.io_quantization.outputs[0].dtype == "int8"
    assert manifest.edgetpu.compiler_command == placement["compiler_command"]
    assert manifest.edgetpu.model_dump()["placement"] == placement["placement"]


def test_an_op_onnx2tf_cannot_convert_is_one_line_and_a_log_while_onnxruntime_builds(tmp_path):
    project = _lppool_project(tmp_path / "project")
    out = tmp_path / "out"
    result = run_build(BuildRequest(config_path=project, profile="rpi4", out_dir=out, cache_dir=tmp_path / "cache"))

    report = result.report
    assert result.exit_code == 0
    assert not [v for v in report.variants if v.runtime == "tflite"]
    assert report.selected in ("fp32", "int8")
    (note,) = [n for n in report.notes if n.startswith("tflite variants not built")]
    assert "\n" not in note
    failed = [f for f in report.failed_variants if f.runtime == "tflite"]
    assert failed and all(f.name.startswith("tflite-") and "LpPool" in f.reason for f in failed)
    assert "LpPool node 'lp_pool'" in note and "lp-cnn-0.1.0-rpi4.onnx2tf.log" in note
    log = (out / "lp-cnn-0.1.0-rpi4.onnx2tf.log").read_text()
    assert "LpPool OP is not yet implemented" in log
    _assert_offline(log, out)


def test_offline_where_onnx2tf_would_fetch_its_sample_images(tmp_path):
    # An NHWC RGB input is what makes onnx2tf fetch its MS-COCO sample for a dummy inference.
    model = _rgb_nhwc_model(tmp_path / "rgb.onnx")
    data = _data_for(model, tmp_path)
    ctx = PassContext(work_dir=tmp_path / "work", profile=None, build=None, data=data)
    ctx.work_dir.mkdir()

    output = load_all_passes()["tflite-convert"].from_dict({"calibration_samples": 8}).run(model, ctx)

    assert set(output.info["files"]) == {"fp32", "fp16", "dynamic-int8", "full-int8"}
    log = (ctx.work_dir / "onnx2tf.log").read_text()
    assert "handing it the user's calibration data instead (no download)" in log and BLOCKED_MARK not in log
    # And a download attempt, had one happened, fails loudly in the runner.
    probe = ("from builder.passes.tflite.onnx2tf_runner import _block_network\n"
             "attempts = {'network_attempts': []}\n_block_network(attempts)\n"
             "import urllib.request\nurllib.request.urlopen('https://github.com/PINTO0309/onnx2tf/releases', timeout=5)\n")
    refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert refused.returncode != 0 and BLOCKED_MARK in refused.stderr


# ---------------------------------------------------------------- tiny models
def _lppool_project(folder: Path) -> Path:
    """Conv → Relu → LpPool → Flatten → Gemm: onnxruntime runs LpPool, onnx2tf has no converter for it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
               numpy_helper.from_array(rng.normal(0, 0.3, (4, 128)).astype(np.float32), "w2"),
               numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("LpPool", ["r1"], ["p1"], name="lp_pool", kernel_shape=[2, 2], strides=[2, 2], p=2),
             helper.make_node("Flatten", ["p1"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "lp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(folder / "model.onnx"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    calib = rng.random((32, 1, 8, 8), dtype=np.float32)
    val = rng.random((60, 1, 8, 8), dtype=np.float32)
    labels = np.array([session.run(None, {"input": val[i:i + 1]})[0].argmax() for i in range(len(val))])
    np.savez(folder / "calib.npz", input=calib)
    np.savez(folder / "val.npz", input=val, labels=labels)
    config = {"name": "lp-cnn", "version": "0.1.0", "model": "model.onnx",
              "data": {"calibration": "calib.npz", "validation": "val.npz"}, "metric": "top1",
              "gates": {"max_accuracy_drop": 0.05}, "optimize": {"precisions": ["fp32", "int8"]},
              "benchmark": {"warmup": 2, "runs": 10}}
    (folder / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "edgepack.yaml"


def _rgb_nhwc_model(path: Path) -> Path:
    """Input [1, 8, 8, 3] (an NHWC RGB image) → Transpose → Conv → Relu → GlobalAveragePool → Flatten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["scores"], name="flatten")]
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b")]
    graph = helper.make_graph(nodes, "rgb", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 8, 8, 3])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _data_for(model: Path, folder: Path):
    from builder.data import load_build_data

    images = np.random.default_rng(2).random((16, 8, 8, 3), dtype=np.float32)
    np.savez(folder / "calib.npz", image=images)
    data = load_build_data(folder / "calib.npz", folder / "calib.npz", "labels")
    data.check_against({"image": (1, 8, 8, 3)}, {"image": np.dtype("float32")})
    return data
