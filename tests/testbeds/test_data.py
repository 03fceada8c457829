"""Test material: the committed digits example and the generated projects for real third-party models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgepack.config import load_build_config

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _locate(locate):
    # The models come from requirements-testmodels.txt, which `make test` installs: missing is a failure.
    return locate()


# --- examples/digits ---------------------------------------------------------------------------


def test_digits_files_have_the_documented_layout():
    with np.load(DIGITS / "data" / "calib.npz") as npz:
        assert sorted(npz.files) == ["input"]
        calib = npz["input"]
    with np.load(DIGITS / "data" / "val.npz") as npz:
        assert sorted(npz.files) == ["input", "labels"]
        x, labels = npz["input"], npz["labels"]
    assert calib.dtype == np.float32 and calib.shape == (256, 1, 8, 8)
    assert x.dtype == np.float32 and x.shape == (360, 1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (360,)
    for array in (calib, x):
        assert array.min() >= 0.0 and array.max() <= 1.0
    assert np.bincount(labels, minlength=10).min() >= 35  # stratified: 36 of each class (±1)
    assert not any(np.array_equal(c, v) for c in calib[:16] for v in x)  # calibration comes from training data


def test_digits_config_loads_and_points_at_the_files():
    config = load_build_config(DIGITS / "edgepack.yaml")
    assert config.name == "digits-cnn" and config.metric == "top1"
    assert config.inputs == {"input": (1, 1, 8, 8)}
    for path in (config.model_path, config.calibration_path, config.validation_path):
        assert path.is_file()


def test_digits_float_model_scores_high_and_takes_any_batch():
    session = _session(DIGITS / "model.onnx")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.shape[1:] == [1, 8, 8] and isinstance(inp.shape[0], str)
    with np.load(DIGITS / "data" / "val.npz") as npz:
        x, labels = npz["input"], npz["labels"]
    logits = session.run(["logits"], {"input": x})[0]
    assert logits.shape == (360, 10)
    assert (logits.argmax(1) == labels).mean() >= 0.95
    single = session.run(["logits"], {"input": x[:1]})[0]
    np.testing.assert_allclose(single, logits[:1], rtol=1e-4, atol=1e-4)


def test_digits_static_int8_keeps_accuracy_and_shrinks_the_file(tmp_path):
    """The example's reason to exist: plain per-channel QDQ INT8 fits its gates with room to spare."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = np.load(DIGITS / "data" / "calib.npz")["input"]
    with np.load(DIGITS / "data" / "val.npz") as npz:
        x, labels = npz["input"], npz["labels"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter({"input": calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self._feeds, None)

    float_path, int8_path = DIGITS / "model.onnx", tmp_path / "int8.onnx"
    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
    top1 = {p: (_session(p).run(["logits"], {"input": x})[0].argmax(1) == labels).mean() for p in (float_path, int8_path)}
    assert top1[float_path] - top1[int8_path] <= 0.005
    assert int8_path.stat().st_size <= 0.30 * float_path.stat().st_size


# --- PP-OCR text direction classifier ----------------------------------------------------------


@pytest.fixture(scope="module")
def ppocr_project(tmp_path_factory):
    from testbeds import models, ppocr_cls

    _locate(models.ppocr_cls_model)
    return ppocr_cls.make_project(tmp_path_factory.mktemp("ppocr"))


def test_ppocr_resize_matches_cv2_bilinear():
    from testbeds.ppocr_cls import _resize_bilinear

    row = np.array([[[0], [255]]], dtype=np.uint8)  # 1x2, one channel
    # cv2.resize(row, (4, 1)) gives [0, 64, 191, 255] (half-pixel centres, edges clamped)
    assert _resize_bilinear(row, 4, 1)[0, :, 0].tolist() == [0, 64, 191, 255]


def test_ppocr_preprocess_keeps_aspect_and_pads():
    from testbeds.ppocr_cls import preprocess

    square = np.full((24, 24, 3), 255, dtype=np.uint8)
    out = preprocess(square)
    assert out.shape == (3, 48, 192) and out.dtype == np.float32
    assert np.all(out[:, :, :48] == 1.0) and np.all(out[:, :, 48:] == 0.0)
    wide = np.zeros((10, 1000, 3), dtype=np.uint8)  # wider than 4:1: squeezed to the full width
    assert np.all(preprocess(wide) == -1.0)


def test_ppocr_project_is_deterministic_and_well_formed(ppocr_project, tmp_path):
    from testbeds import ppocr_cls

    again = ppocr_cls.make_project(tmp_path / "again")
    for name in ("calib.npz", "val.npz"):
        with np.load(ppocr_project.parent / name) as a, np.load(again.parent / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    with np.load(ppocr_project.parent / "calib.npz") as npz:
        assert npz["x"].shape == (64, 3, 48, 192) and npz["x"].dtype == np.float32
    with np.load(ppocr_project.parent / "val.npz") as npz:
        x, labels = npz["x"], npz["labels"]
    assert x.shape == (200, 3, 48, 192) and labels.dtype == np.int64
    assert labels.sum() == 100 and x.min() >= -1.0 and x.max() <= 1.0
    other, _ = ppocr_cls.make_dataset(4, seed=99)
    assert not np.array_equal(other, x[:4])

    config = load_build_config(ppocr_project)
    assert config.name == "ppocr-cls" and config.metric == "top1"
    assert config.inputs == {"x": (1, 3, 48, 192)}
    assert config.model_path.is_absolute() and config.model_path.is_file()
    assert config.validation_path.is_file() and config.calibration_path.is_file()


def test_ppocr_real_model_reads_the_rendered_lines(ppocr_project):
    from testbeds.models import ppocr_cls_model

    with np.load(ppocr_project.parent / "val.npz") as npz:
        x, labels = npz["x"], npz["labels"]
    scores = _session(ppocr_cls_model()).run(None, {"x": x})[0]
    assert scores.shape == (200, 2)
    assert (scores.argmax(1) == labels).mean() >= 0.85


# --- Silero VAD --------------------------------------------------------------------------------


def test_silero_project_shapes_and_outputs(tmp_path):
    from testbeds import models, silero

    model = _locate(models.silero_vad_model)
    path = silero.make_project(tmp_path, n_calib=32, n_val=48)
    config = load_build_config(path)
    assert config.metric == "mae"
    assert config.inputs is None  # fixed shapes break onnxruntime's If type inference (see make_project)
    assert config.model_path == model.resolve()
    pinned = load_build_config(silero.make_project(tmp_path / "pinned", n_calib=2, n_val=2, static_shapes=True))
    assert pinned.inputs == {"input": (1, 576), "state": (2, 1, 128)}

    for name, n in (("calib.npz", 32), ("val.npz", 48)):
        with np.load(tmp_path / name) as npz:
            assert sorted(npz.files) == ["input", "sr", "state"]
            assert npz["input"].shape == (n, 1, 576) and npz["input"].dtype == np.float32
            assert npz["state"].shape == (n, 2, 1, 128) and npz["state"].dtype == np.float32
            assert npz["sr"].shape == (n,) and npz["sr"].dtype == np.int64 and np.all(npz["sr"] == 16000)

    with np.load(tmp_path / "val.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    # every clip starts from a zero state; later calls carry the state the model produced
    assert not np.any(data["state"][0]) and np.any(data["state"][1])
    session = _session(model)
    probs = np.array([
        session.run(["output"], {"input": data["input"][i], "state": data["state"][i], "sr": np.array(data["sr"][i])})[0][0, 0]
        for i in range(len(data["sr"]))
    ])
    assert probs.min() < 0.1 and probs.max() > 0.8  # noise and speech-like chunks both present

    again = silero.make_dataset(48, seed=2)  # make_project's validation stream for seed 0
    for key, value in again.items():
        np.testing.assert_array_equal(value, data[key])
