"""A build project for a real model: PaddleOCR's PP-OCRv4 text recognizer on rendered text lines.

The model (`ch_PP-OCRv4_rec_infer.onnx`, shipped in `rapidocr-onnxruntime`) takes `x` float32
[N, 3, 48, W] (W dynamic) and returns softmax scores [N, W / 8, 6625] for CTC decoding over RapidOCR's
character list: index 0 "blank", then the 6623 characters of the model's `character` metadata (split with
`str.splitlines`, as RapidOCR's `OrtInferSession.get_character_list` does), then " " (index 6624).
`ctc_decode` is RapidOCR's `CTCLabelDecode`: argmax per time step, a step repeating the previous step's
index dropped, blanks dropped; it does not strip the result.

This module renders text lines the way a text detector would crop them (one line of random ASCII words and
numbers from testbeds.ppocr_cls, upright, dark ink on a light, slightly noisy, sometimes blurred background,
margins up to a quarter of the font size) and preprocesses them exactly as RapidOCR's
`TextRecognizer.resize_norm_img` does with rec_img_shape [3, 48, 320]:

    batch width = int(48 * max_wh_ratio), max_wh_ratio = max(320 / 48, the batch's widest w / h);
    resize to height 48 keeping the aspect ratio (width = ceil(48 * w / h), capped at the batch width;
    cv2.resize's bilinear, done in numpy by testbeds.ppocr_cls._resize_bilinear, which matches cv2's
    INTER_LINEAR, rather than PIL's BILINEAR, which antialiases when it shrinks),
    /255, (x - 0.5) / 0.5, HWC -> CHW, right-pad with zeros to the batch width.

Every rendered line is at most 20:3 (w:h), so the batch width is always 320 and the npz files hold one
array [N, 3, 48, 320], exactly what RapidOCR would feed the model for these lines in any batch. Words are
drawn 0.3-0.5 em apart because the embedded font's own space (0.2 em) is so narrow that the model often
reads it as no space. Images are BGR, as `cv2.imread` gives them; the font is Pillow's embedded Aileron
(`ImageFont.load_default(size=...)`, Pillow >= 10.1 with FreeType): no downloads, no system fonts.
Everything is a function of the seed. `val.npz` has no labels (the texts come back from `make_dataset`):
metric `agreement` compares each variant's argmax at every one of the 40 time steps with the float model's
(builder.verify: a line agrees when all its steps do, so it reads the same), and `gates.max_accuracy_drop:
0.02` lets a variant through at 98% agreement or more. (Agreement used to compare only the argmax of the
whole flattened [40, 6625] output, a near tie among the 40 confident steps that rounding decided: fp16,
reading all 64 validation lines exactly as fp32, agreed on none.) Decode with `ctc_decode` to compare what
a reader sees.

The float model (onnxruntime 1.32.0 CPU, Pillow 13.0.0) reads the rendered lines well; exact = the decoded
text, stripped of the leading/trailing spaces the model sometimes reads into the margins, equals the rendered
text:

    make_project's val.npz (seed 0: 64 lines)   exact 62/64 (96.9%)   characters 99.7% (1 - edits / length)
    the first 32 of them (the test's)           exact 31/32 (96.9%)   characters 99.7%
    512 lines of seed 100                       exact 463/512 (90.4%) characters 99.0%; unstripped exact 86.1%

Most misreadings are glyphs Aileron draws alike (I and l, O and 0, & read as 8), a dropped space between two
words, or j read as i at the smallest sizes.

    python -m testbeds.ppocr_rec OUT_DIR [--n-calib 32] [--n-val 64] [--seed 0]
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter

from testbeds.models import ppocr_rec_model
from testbeds.project import project_main, write_config
from testbeds.ppocr_cls import _font, _resize_bilinear, _text

HEIGHT, WIDTH = 48, 320
MAX_WH_RATIO = WIDTH / HEIGHT  # RapidOCR's batch width starts at imgW / imgH and only grows
BLANK = 0


def _layout(words: list[str], size: int, gap: int, pads: tuple[int, int, int]) -> tuple[int, int, list[int]]:
    """(width, height, x of each word) of the crop that holds `words`, `gap` pixels apart, at font `size`
    with pads (x, top, bottom)."""
    font = _font(size)
    ascent, descent = font.getmetrics()
    pad_x, pad_top, pad_bottom = pads
    xs, x = [], pad_x - font.getbbox(words[0])[0]
    for word in words:
        xs.append(x)
        x += int(round(font.getlength(word))) + gap
    right = xs[-1] + font.getbbox(words[-1])[2]
    return right + pad_x, ascent + descent + pad_top + pad_bottom, xs


def render_line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One upright text line as a detector crop and its text: (uint8 BGR [h, w, 3], str).

    Words are drawn one by one, 0.3-0.5 em apart (the embedded font's own space is 0.2 em, narrower than
    most text fonts', and the model often reads it as no space at all). The crop is never wider than
    `MAX_WH_RATIO` times its height: words are dropped from the end until it fits, so that a fixed width of
    320 is exactly what RapidOCR would feed the model for the line."""
    size = int(rng.integers(14, 41))
    font = _font(size)
    words = _text(rng).split(" ")
    gap = int(round(size * rng.uniform(0.3, 0.5)))
    pads = (int(rng.integers(1, max(2, size // 4))), int(rng.integers(1, max(2, size // 4))),
            int(rng.integers(1, max(2, size // 4))))
    while True:
        w, h, xs = _layout(words, size, gap, pads)
        if w <= MAX_WH_RATIO * h:
            break
        if len(words) > 1:
            words.pop()
        else:  # one very long word: shorten it
            words = [words[0][:-1]]

    paper = int(rng.integers(175, 256))
    background = tuple(int(np.clip(paper + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    ink_level = int(rng.integers(0, 90))
    ink = tuple(int(np.clip(ink_level + rng.integers(-25, 26), 0, 255)) for _ in range(3))

    image = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(image)
    for x, word in zip(xs, words):
        draw.text((x, pads[1]), word, font=font, fill=ink)
    blur = float(rng.uniform(0.0, 0.8))
    if blur > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(1.0, 8.0), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[:, :, ::-1].copy(), " ".join(words)  # RGB -> BGR


def preprocess(image: np.ndarray, max_wh_ratio: float = MAX_WH_RATIO) -> np.ndarray:
    """RapidOCR's `TextRecognizer.resize_norm_img` for one uint8 BGR crop: float32 [3, 48, int(48 * max_wh_ratio)]."""
    width = int(HEIGHT * max_wh_ratio)
    h, w = image.shape[:2]
    ratio = w / float(h)
    resized_w = width if math.ceil(HEIGHT * ratio) > width else int(math.ceil(HEIGHT * ratio))
    resized = _resize_bilinear(image, resized_w, HEIGHT).astype(np.float32)
    resized = resized.transpose(2, 0, 1) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((3, HEIGHT, width), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`n` preprocessed lines, float32 [n, 3, 48, 320], and their texts, from `seed` alone."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, 3, HEIGHT, WIDTH), dtype=np.float32)
    texts = []
    for i in range(n):
        line, text = render_line(rng)
        x[i] = preprocess(line)
        texts.append(text)
    return x, texts


@lru_cache(maxsize=None)
def _characters(model: str) -> tuple[str, ...]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return tuple(session.get_modelmeta().custom_metadata_map["character"].splitlines())


def characters(model: Path | None = None) -> list[str]:
    """RapidOCR's `CTCLabelDecode.character` for the model: "blank", the dictionary from the model's metadata
    (`character`, split with `str.splitlines`), then " " — one entry per output class (6625)."""
    return ["blank", *_characters(str(model or ppocr_rec_model())), " "]


def ctc_decode(probs: np.ndarray, characters: list[str]) -> list[str]:
    """Greedy CTC decoding as RapidOCR's `CTCLabelDecode` does it: argmax per time step, drop a step that
    repeats the previous step's index, drop blanks (index 0). `probs` is [N, T, C], `characters` has C entries."""
    if probs.ndim != 3 or probs.shape[2] != len(characters):
        raise ValueError(f"probs must be [N, T, {len(characters)}], got {list(probs.shape)}")
    texts = []
    for index in probs.argmax(axis=2):
        keep = np.ones(len(index), dtype=bool)
        keep[1:] = index[1:] != index[:-1]
        keep &= index != BLANK
        texts.append("".join(characters[i] for i in index[keep]))
    return texts


def make_project(out_dir: Path, *, n_calib: int = 32, n_val: int = 64, seed: int = 0) -> Path:
    """Write model.onnx (a copy), calib.npz and val.npz ({x} each) and edgepack.yaml; returns the config's path.

    Calibration and validation come from independent streams of the same seed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_calib, _ = make_dataset(n_calib, seed=seed * 2 + 1)
    x_val, _ = make_dataset(n_val, seed=seed * 2 + 2)
    np.savez(out_dir / "calib.npz", x=x_calib)
    np.savez(out_dir / "val.npz", x=x_val)
    (out_dir / "model.onnx").write_bytes(ppocr_rec_model().read_bytes())
    return write_config(out_dir, name="ppocr-rec", version="4.0.0", model="model.onnx", inputs={"x": [1, 3, HEIGHT, WIDTH]},
                        metric="agreement", max_accuracy_drop=0.02)


def main(argv: list[str] | None = None) -> int:
    return project_main(argv, prog="python -m testbeds.ppocr_rec", description=__doc__.split("\n\n")[0],
                        make_project=make_project, n_calib=32, n_val=64)


if __name__ == "__main__":
    raise SystemExit(main())
