"""PP-OCRv4 text recognition as test material (testbeds/ppocr_rec.py): the rendered lines, RapidOCR's
preprocessing and CTC decoding, the build project, and that the shipped float model reads the lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from builder.data import load_build_data
from edgepack.config import load_build_config
from testbeds import ppocr_rec
from testbeds.models import ppocr_rec_model

N_VAL = 32


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    ppocr_rec_model()  # from requirements-testmodels.txt: missing is a failure
    return ppocr_rec.make_project(tmp_path_factory.mktemp("ppocr-rec"), n_calib=8, n_val=N_VAL)


# --- decoder and preprocessing ----------------------------------------------------------------


def test_characters_are_rapidocrs_list_blank_dictionary_space():
    chars = ppocr_rec.characters()
    assert len(chars) == 6625 and chars[0] == "blank" and chars[-1] == " "
    assert all(len(c) == 1 for c in chars[1:])
    assert set("abcXYZ0189$%&#/+-.()") <= set(chars[1:-1]) and " " not in chars[1:-1]


def test_ctc_decode_drops_repeats_then_blanks():
    chars = ["blank", "a", "b", " "]
    steps = [[1, 1, 0, 1, 2, 2, 3, 0, 0, 2], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    probs = np.eye(4, dtype=np.float32)[np.array(steps)]  # one-hot [2, 10, 4]
    assert ppocr_rec.ctc_decode(probs, chars) == ["aab b", ""]
    with pytest.raises(ValueError, match="probs"):
        ppocr_rec.ctc_decode(probs, chars[:3])


def test_preprocess_is_rapidocrs_resize_norm_img():
    narrow = np.full((24, 24, 3), 255, dtype=np.uint8)
    out = ppocr_rec.preprocess(narrow)
    assert out.shape == (3, 48, 320) and out.dtype == np.float32
    assert np.all(out[:, :, :48] == 1.0) and np.all(out[:, :, 48:] == 0.0)
    wide = np.zeros((10, 1000, 3), dtype=np.uint8)  # wider than 20:3: squeezed to the batch width
    assert np.all(ppocr_rec.preprocess(wide) == -1.0)
    # RapidOCR widens a batch to its widest line: int(48 * max_wh_ratio), never narrower than 320
    assert ppocr_rec.preprocess(wide, max_wh_ratio=100.0).shape == (3, 48, 4800)


def test_lines_fit_the_fixed_width_and_come_from_the_seed():
    rng = np.random.default_rng(5)
    for _ in range(100):
        image, text = ppocr_rec.render_line(rng)
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert w / h <= ppocr_rec.MAX_WH_RATIO and text and text == text.strip() and "  " not in text
    x, texts = ppocr_rec.make_dataset(4, seed=7)
    again, same = ppocr_rec.make_dataset(4, seed=7)
    np.testing.assert_array_equal(x, again)
    assert texts == same and texts != ppocr_rec.make_dataset(4, seed=8)[1]


# --- the build project ------------------------------------------------------------------------


def test_project_loads_with_the_builder_and_its_data_fits_the_model(project):
    config = load_build_config(project)
    assert config.name == "ppocr-rec" and config.metric == "agreement"
    assert config.gates.max_accuracy_drop == 0.02 and config.gates.min_agreement is None
    assert config.optimize.precisions == ("fp32", "fp16", "int8")
    assert config.inputs == {"x": (1, 3, 48, 320)}
    assert config.model_path == project.parent / "model.onnx" and config.model_path.is_file()
    assert config.model_path.read_bytes() == ppocr_rec_model().read_bytes()
    data = load_build_data(config.calibration_path, config.validation_path)
    assert data.calibration.count == 8 and data.validation.count == N_VAL and data.validation.labels is None
    for split in (data.calibration, data.validation):
        assert list(split.arrays) == ["x"]
        x = split.arrays["x"]
        assert x.dtype == np.float32 and x.shape[1:] == (3, 48, 320)
        assert x.min() >= -1.0 and x.max() <= 1.0
    data.check_against(dict(config.inputs), {"x": np.float32})
    assert len(list(data.feeds("validation"))) == N_VAL


def test_fp32_model_reads_the_rendered_lines(project):
    x, texts = ppocr_rec.make_dataset(N_VAL, seed=2)  # make_project's validation stream for seed 0
    with np.load(project.parent / "val.npz") as npz:
        np.testing.assert_array_equal(npz["x"], x)
    probs = _session(project.parent / "model.onnx").run(None, {"x": x})[0]
    assert probs.shape == (N_VAL, 40, 6625)
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-4)
    decoded = ppocr_rec.ctc_decode(probs, ppocr_rec.characters())
    # Measured: 31 of these 32 lines exactly (see the module's docstring).
    exact = np.mean([d.strip() == t for d, t in zip(decoded, texts)])
    assert exact >= 0.9, list(zip(texts, decoded))


def test_cli_writes_a_project(tmp_path, capsys):
    assert ppocr_rec.main([str(tmp_path / "p"), "--n-calib", "2", "--n-val", "3", "--seed", "1"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "p" / "edgepack.yaml"
    assert load_build_config(path).inputs == {"x": (1, 3, 48, 320)}
    with np.load(tmp_path / "p" / "val.npz") as npz:
        assert npz.files == ["x"]
        np.testing.assert_array_equal(npz["x"], ppocr_rec.make_dataset(3, seed=4)[0])
