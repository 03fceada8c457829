"""A build project for a real stateful model: Silero VAD v5 (`silero_vad/data/silero_vad.onnx`).

Model inputs and output:

    input   float32 [1, 576]     one 512-sample chunk of 16 kHz audio, preceded by the last 64 samples
                                 of the previous chunk (zeros for the first); this is what
                                 `silero_vad.utils_vad.OnnxWrapper` feeds. A bare 512-sample chunk is
                                 accepted too, but then the model answers ~0.00 for speech and noise alike.
    state   float32 [2, 1, 128]  recurrent state (zeros at the start of a stream)
    sr      int64   scalar       sample rate, always 16000 here
    output  float32 [1, 1]       speech probability of the chunk (also returns `stateN`)

Data layout of `calib.npz` and `val.npz`: one array per model input, first axis = samples, the rest is
that input's shape for one call:

    input [N, 1, 576] float32    state [N, 2, 1, 128] float32    sr [N] int64 (16000 each)

The audio is synthesized from the seed alone: formant-filtered glottal pulse trains with syllable
envelopes and fricative bursts ("speech", optionally in noise), white/pink/brown noise, and near
silence. Each clip is streamed through the float model chunk by chunk and every call is recorded with
the state the model really had at that point, so calibration sees the state ranges met in service, not
only zeros. `val.npz` holds no labels: metric `mae` then measures the mean absolute deviation of the
speech probability from the fp32 model.

    python -m testbeds.silero OUT_DIR [--n-calib 64] [--n-val 256] [--seed 0] [--static-shapes]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from testbeds.models import silero_vad_model
from testbeds.project import project_main, write_config

SAMPLE_RATE = 16000
CHUNK = 512
CONTEXT = 64
STATE_SHAPE = (2, 1, 128)
CLIP_CHUNKS = 16  # 0.5 s per clip


def _lfilter(b: list[float], a: list[float], x: np.ndarray) -> np.ndarray:
    """`scipy.signal.lfilter(b, a, x)` for stable filters, in numpy: multiply by the frequency response.

    The transform is zero-padded to at least twice the signal, so the (decaying) impulse responses of
    the filters used here wrap around with negligible energy. numpy only, so the test material needs
    no scipy.
    """
    n = len(x)
    size = 1 << int(np.ceil(np.log2(2 * n + 1024)))
    z_inv = np.exp(-1j * np.pi * np.arange(size // 2 + 1) / (size // 2))
    response = np.polyval(np.asarray(b, dtype=np.float64)[::-1], z_inv) / np.polyval(np.asarray(a, dtype=np.float64)[::-1], z_inv)
    return np.fft.irfft(np.fft.rfft(x, size) * response, size)[:n]


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    return _lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], x)


def _speech(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 2 * np.pi)))
    phase = np.cumsum(f0) / SAMPLE_RATE
    source = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
    source = _lfilter([1], [1, -0.97], source) + 0.02 * rng.standard_normal(n)
    segment = int(SAMPLE_RATE / rng.uniform(3, 6))  # one syllable
    out = np.zeros(n)
    for a in range(0, n, segment):
        b = min(n, a + segment)
        length = b - a
        formants = (rng.uniform(300, 850), rng.uniform(850, 2300), rng.uniform(2300, 3300))
        voiced = sum(
            gain * _resonator(source[a:b], f, bw) for f, bw, gain in zip(formants, (80, 120, 180), (1.0, 0.6, 0.3))
        )
        voiced = voiced * np.sin(np.pi * np.arange(length) / length) ** 0.5
        if rng.random() < 0.5:  # a fricative onset
            k = int(length * rng.uniform(0.05, 0.25))
            voiced[:k] += _lfilter([1, -1], [1], rng.standard_normal(k)) * 0.3 * np.std(voiced)
        out[a:b] = voiced
    out = _lfilter([1, -0.9], [1], out)  # lip radiation
    return out / (np.abs(out).max() + 1e-9) * rng.uniform(0.1, 0.7)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    white = rng.standard_normal(n)
    colour = rng.integers(3)
    if colour == 1:  # pink-ish
        white = _lfilter([0.049922, -0.095993, 0.050612, -0.004408], [1, -2.494956, 2.017265, -0.522189], white)
    elif colour == 2:  # brown-ish
        white = _lfilter([1], [1, -0.98], white)
    return white / (np.std(white) + 1e-9) * rng.uniform(0.003, 0.1)


def make_clip(rng: np.random.Generator, n_chunks: int = CLIP_CHUNKS) -> np.ndarray:
    """One clip of `n_chunks` * 512 samples: speech, speech in noise, noise or near silence."""
    n = n_chunks * CHUNK
    kind = rng.random()
    if kind < 0.4:
        audio = _speech(rng, n) + _noise(rng, n) * 0.1
    elif kind < 0.6:
        audio = _speech(rng, n) + _noise(rng, n)
    elif kind < 0.85:
        audio = _noise(rng, n)
    else:
        audio = rng.standard_normal(n) * rng.uniform(1e-5, 1e-3)
    return np.clip(audio, -1, 1).astype(np.float32)


def _session():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(silero_vad_model()), options, providers=["CPUExecutionProvider"])


def make_dataset(n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` recorded model calls ({input, state, sr}) from clips streamed through the float model."""
    rng = np.random.default_rng(seed)
    session = _session()
    sr = np.array(SAMPLE_RATE, dtype=np.int64)
    inputs: list[np.ndarray] = []
    states: list[np.ndarray] = []
    while len(inputs) < n:
        clip = make_clip(rng)
        state = np.zeros(STATE_SHAPE, dtype=np.float32)
        context = np.zeros(CONTEXT, dtype=np.float32)
        for start in range(0, len(clip), CHUNK):
            if len(inputs) == n:
                break
            chunk = clip[start : start + CHUNK]
            frame = np.concatenate([context, chunk])[None, :]
            inputs.append(frame)
            states.append(state)
            _, state = session.run(None, {"input": frame, "state": state, "sr": sr})
            state = np.asarray(state, dtype=np.float32)
            context = chunk[-CONTEXT:]
    return {
        "input": np.stack(inputs).astype(np.float32),
        "state": np.stack(states).astype(np.float32),
        "sr": np.full(n, SAMPLE_RATE, dtype=np.int64),
    }


def make_project(out_dir: Path, n_calib: int = 64, n_val: int = 256, seed: int = 0, static_shapes: bool = False) -> Path:
    """Write `calib.npz`, `val.npz` (both {input, state, sr}) and `edgepack.yaml`; return the yaml path.

    With `static_shapes`, the config pins `inputs: {input: [1, 576], state: [2, 1, 128]}`. onnxruntime
    (1.32) then refuses to load the model: the `If` on `sr` holds an 8 kHz and a 16 kHz branch and
    type inference of the branch that does not apply fails on fixed shapes ("LSTM: First input tensor
    must have rank 3"). Left out by default, so the project builds for onnxruntime targets with the
    dynamic shapes the model was exported with (the data still fixes what each call looks like).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = silero_vad_model()
    np.savez(out_dir / "calib.npz", **make_dataset(n_calib, seed=seed * 2 + 1))
    np.savez(out_dir / "val.npz", **make_dataset(n_val, seed=seed * 2 + 2))
    inputs = {"input": [1, CONTEXT + CHUNK], "state": list(STATE_SHAPE)} if static_shapes else None
    return write_config(out_dir, name="silero-vad", version="5.0.0", model=str(model.resolve()), inputs=inputs,
                        metric="mae", max_accuracy_drop=0.05)


def main(argv: list[str] | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--static-shapes", action="store_true", help="pin `inputs:` in edgepack.yaml (see make_project)")

    return project_main(argv, prog="python -m testbeds.silero", description="Write a Silero VAD build project.",
                        make_project=make_project, n_calib=64, n_val=256, options=options)


if __name__ == "__main__":
    raise SystemExit(main())
