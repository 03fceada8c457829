"""A build project for a real model: PaddleOCR's text-direction classifier on rendered text lines.

The model (`ch_ppocr_mobile_v2.0_cls_infer.onnx`, shipped in `rapidocr-onnxruntime`) takes `x`
float32 [N, 3, 48, 192] and returns softmax scores over two labels: 0 = upright text, 1 = text rotated
by 180°. This module renders text lines the way a text detector would crop them (one line of random
ASCII words and numbers, dark ink on a light, slightly noisy background), rotates half of them by 180°
and preprocesses them exactly as PaddleOCR/RapidOCR's `TextClassifier.resize_norm_img` does:

    resize to height 48 keeping the aspect ratio (width = min(192, ceil(48 * w / h)), cv2 bilinear),
    /255, (x - 0.5) / 0.5, HWC -> CHW, right-pad with zeros to width 192.

Images are kept in BGR channel order, as `cv2.imread` would give them. The font is Pillow's embedded
one (`ImageFont.load_default(size=...)`, Pillow >= 10.1 with FreeType): no downloads, no system fonts.
Everything is a function of the seed.

    python -m testbeds.ppocr_cls OUT_DIR [--n-calib 64] [--n-val 200] [--seed 0]
"""

from __future__ import annotations

import math
import string
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from testbeds.models import ppocr_cls_model
from testbeds.project import project_main, write_config

HEIGHT, WIDTH = 48, 192
UPRIGHT, ROTATED = 0, 1


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow < 10.1 or built without FreeType
        raise RuntimeError("Pillow >= 10.1 with FreeType is needed for a scalable embedded font")
    return font


def _word(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.2:
        return "".join(rng.choice(list(string.digits), size=int(rng.integers(1, 7))))
    if kind < 0.25:
        return str(rng.choice(["-", "&", "+", "/", "%", "#", "$12.50", "(A)", "No.", "e-mail:"]))
    word = "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(2, 10))))
    case = rng.random()
    if case < 0.25:
        return word.capitalize()
    if case < 0.35:
        return word.upper()
    return word


def _text(rng: np.random.Generator) -> str:
    return " ".join(_word(rng) for _ in range(int(rng.integers(1, 5))))


def render_line(rng: np.random.Generator) -> np.ndarray:
    """One upright text line as a detector crop: uint8 BGR [h, w, 3]."""
    size = int(rng.integers(14, 41))
    font = _font(size)
    text = _text(rng)
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    pad_x = int(rng.integers(2, max(3, size // 2)))
    pad_top = int(rng.integers(1, max(2, size // 4)))
    pad_bottom = int(rng.integers(1, max(2, size // 4)))
    w, h = (right - left) + 2 * pad_x, ascent + descent + pad_top + pad_bottom

    paper = int(rng.integers(175, 256))
    background = tuple(int(np.clip(paper + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    ink_level = int(rng.integers(0, 90))
    ink = tuple(int(np.clip(ink_level + rng.integers(-25, 26), 0, 255)) for _ in range(3))

    image = Image.new("RGB", (w, h), background)
    ImageDraw.Draw(image).text((pad_x - left, pad_top), text, font=font, fill=ink)
    blur = float(rng.uniform(0.0, 0.8))
    if blur > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(1.0, 8.0), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[:, :, ::-1].copy()  # RGB -> BGR


def _resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(image, (width, height))` (INTER_LINEAR, half-pixel centres, no antialiasing) in numpy."""
    h, w = image.shape[:2]

    def taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
        lo = np.floor(src)
        frac = src - lo
        lo = lo.astype(np.int64)
        frac = np.where(lo < 0, 0.0, frac)
        frac = np.where(lo >= in_size - 1, 0.0, frac)
        lo = np.clip(lo, 0, in_size - 1)
        hi = np.clip(lo + 1, 0, in_size - 1)
        return lo, hi, frac

    y0, y1, fy = taps(height, h)
    x0, x1, fx = taps(width, w)
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray) -> np.ndarray:
    """PaddleOCR's classifier preprocessing of one uint8 BGR crop: float32 [3, 48, 192]."""
    h, w = image.shape[:2]
    resized_w = min(WIDTH, int(math.ceil(HEIGHT * w / float(h))))
    resized = _resize_bilinear(image, resized_w, HEIGHT).astype(np.float32)
    resized = resized.transpose(2, 0, 1) / 255.0
    resized = (resized - 0.5) / 0.5
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` preprocessed lines and their labels (exactly half rotated when n is even), from `seed` alone."""
    rng = np.random.default_rng(seed)
    labels = (rng.permutation(n) % 2).astype(np.int64)
    x = np.empty((n, 3, HEIGHT, WIDTH), dtype=np.float32)
    for i in range(n):
        line = render_line(rng)
        if labels[i] == ROTATED:
            line = line[::-1, ::-1]
        x[i] = preprocess(np.ascontiguousarray(line))
    return x, labels


def make_project(out_dir: Path, n_calib: int = 64, n_val: int = 200, seed: int = 0) -> Path:
    """Write `calib.npz` ({x}), `val.npz` ({x, labels}) and `edgepack.yaml` into `out_dir`; return the yaml path.

    Layout of the npz files: first axis = samples, the rest is the shape of one model input `x`.
    Calibration and validation come from independent streams of the same seed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ppocr_cls_model()
    x_calib, _ = make_dataset(n_calib, seed=seed * 2 + 1)
    x_val, y_val = make_dataset(n_val, seed=seed * 2 + 2)
    np.savez(out_dir / "calib.npz", x=x_calib)
    np.savez(out_dir / "val.npz", x=x_val, labels=y_val)
    return write_config(out_dir, name="ppocr-cls", version="2.0.0", model=str(model.resolve()),
                        inputs={"x": [1, 3, HEIGHT, WIDTH]}, metric="top1", max_accuracy_drop=0.02)


def main(argv: list[str] | None = None) -> int:
    return project_main(argv, prog="python -m testbeds.ppocr_cls", description=__doc__.split("\n\n")[0],
                        make_project=make_project, n_calib=64, n_val=200)


if __name__ == "__main__":
    raise SystemExit(main())
