"""Train the digits example model and write its data files.

Regenerates, next to this script:

    model.onnx        float CNN, opset 13, input `input` [batch, 1, 8, 8], output `logits` [batch, 10]
    data/calib.npz    {"input": float32 [256, 1, 8, 8]}            drawn from the training split
    data/val.npz      {"input": float32 [360, 1, 8, 8], "labels": int64 [360]}   the held-out split

Run from anywhere: `python examples/digits/train.py`. Everything is seeded and runs single-threaded
with deterministic kernels, so a rerun on the same software stack gives the same files.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
SEED = 0
N_VAL = 360
N_CALIB = 256
EPOCHS = 40
BATCH = 64
LR = 3e-3
OPSET = 13


class DigitsCNN(nn.Module):
    """Conv(1→32)-ReLU-Conv(32→64)-ReLU-MaxPool2-Conv(64→80)-ReLU-MaxPool2-Flatten-Linear(320→10).

    68,186 parameters (~270 KB as float ONNX), 95% of them in the convolutions, so per-channel INT8
    weights shrink the file to under 0.3x. Short attribute names and functional ReLU/pooling keep the
    exported tensor names short (they are repeated many times in a QDQ graph).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 80, 3, padding=1)
        self.fc = nn.Linear(80 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4 -> 2x2
        return self.fc(torch.flatten(x, 1))


def seed_everything(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_split(seed: int = SEED):
    """Stratified split of sklearn's digits: (x_train, y_train, x_val, y_val), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=N_VAL, stratify=y, random_state=seed)
    return x_train, y_train, x_val, y_val


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: move each image by -1, 0 or +1 pixel on each axis (zero fill)."""
    n = len(x)
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen).tolist()
    dx = torch.randint(0, 3, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(n)])


def train(x_train: np.ndarray, y_train: np.ndarray) -> DigitsCNN:
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            opt.zero_grad()
            loss_fn(model(random_shift(xt[idx], gen)), yt[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def export(model: DigitsCNN, path: Path) -> None:
    dummy = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def onnx_top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def main() -> int:
    seed_everything(SEED)
    x_train, y_train, x_val, y_val = load_split()
    calib_idx = np.sort(np.random.default_rng(SEED).choice(len(x_train), N_CALIB, replace=False))
    x_calib = np.ascontiguousarray(x_train[calib_idx])

    model = train(x_train, y_train)
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(x_val)).argmax(1).numpy()
    torch_top1 = float((torch_pred == y_val).mean())

    (HERE / "data").mkdir(exist_ok=True)
    np.savez(HERE / "data" / "calib.npz", input=x_calib)
    np.savez(HERE / "data" / "val.npz", input=np.ascontiguousarray(x_val), labels=y_val)
    model_path = HERE / "model.onnx"
    export(model, model_path)
    ort_top1 = onnx_top1(model_path, x_val, y_val)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params}  model.onnx: {model_path.stat().st_size} bytes")
    print(f"validation top-1 ({len(y_val)} samples): torch {torch_top1:.4f}  onnxruntime {ort_top1:.4f}")
    if abs(torch_top1 - ort_top1) > 1e-9:
        print("error: torch and onnxruntime disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
