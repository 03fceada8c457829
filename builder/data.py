"""Calibration and validation data: `.npz` files, one array per model input, first axis = samples.

Every check happens up front (`load_build_data` + `BuildData.check_against`), so a missing file, a
missing input or a wrong shape is a one-line DataError before any pass has spent time.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from edgepack.errors import DataError
from edgepack.files import file_sha256


@dataclasses.dataclass
class DataSplit:
    path: Path
    sha256: str
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0


@dataclasses.dataclass
class BuildData:
    calibration: DataSplit | None
    validation: DataSplit | None
    input_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    input_dtypes: dict[str, np.dtype] = dataclasses.field(default_factory=dict)

    def check_against(self, input_shapes: dict[str, tuple[int, ...]], input_dtypes: dict[str, np.dtype]) -> None:
        """Check every split holds each model input with a per-sample shape the model accepts."""
        self.input_shapes = dict(input_shapes)
        self.input_dtypes = dict(input_dtypes)
        for split_name, split in (("calibration", self.calibration), ("validation", self.validation)):
            if split is None:
                continue
            for name, model_shape in input_shapes.items():
                if name not in split.arrays:
                    raise DataError(
                        f"{split_name} data {split.path.name} has no array for model input {name!r} "
                        f"(arrays: {', '.join(sorted(split.arrays)) or 'none'})"
                    )
                array = split.arrays[name]
                sample_shape = tuple(array.shape[1:])
                if sample_shape != tuple(model_shape) and (1, *sample_shape) != tuple(model_shape):
                    raise DataError(
                        f"{split_name} data {split.path.name}: array {name!r} has per-sample shape "
                        f"{list(sample_shape)} but model input {name!r} expects {list(model_shape)}"
                    )
                want = np.dtype(input_dtypes[name])
                if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu"):
                    raise DataError(
                        f"{split_name} data {split.path.name}: array {name!r} is {array.dtype} but model input {name!r} is {want}"
                    )
                split.arrays[name] = array.astype(want, copy=False)
            extra = sorted(set(split.arrays) - set(input_shapes))
            if extra:
                raise DataError(f"{split_name} data {split.path.name}: arrays {extra} match no model input ({', '.join(input_shapes)})")

    def feeds(self, split: str, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """One feed dict per sample, shaped exactly like the (static) model inputs."""
        data = self.calibration if split == "calibration" else self.validation
        if data is None:
            return
        count = data.count if limit is None else min(limit, data.count)
        for index in range(count):
            yield {
                name: np.asarray(data.arrays[name][index]).reshape(self.input_shapes[name]) for name in self.input_shapes
            }


def _load_npz(path: Path, what: str, labels_key: str | None) -> DataSplit:
    if not path.is_file():
        raise DataError(f"{what} data {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(f"{what} data {path} is not a readable .npz file ({exc})") from None
    labels = arrays.pop(labels_key, None) if labels_key else None
    if not arrays:
        raise DataError(f"{what} data {path} holds no input arrays")
    counts = {key: (a.shape[0] if a.ndim else 0) for key, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(f"{what} data {path}: arrays must share a non-empty first (sample) axis, got {counts}")
    count = next(iter(counts.values()))
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != count):
        raise DataError(f"{what} data {path}: {labels_key!r} has {labels.shape[0] if labels.ndim else 0} entries for {count} samples")
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise DataError(f"{what} data {path}: array {key!r} contains NaN or infinity")
    return DataSplit(path=path, sha256=file_sha256(path), arrays=arrays, labels=labels)


def load_build_data(calibration: Path | None, validation: Path | None, labels_key: str = "labels") -> BuildData:
    """Load both splits; the validation split may carry labels under `labels_key`."""
    calib = _load_npz(calibration, "calibration", labels_key) if calibration else None
    val = _load_npz(validation, "validation", labels_key) if validation else None
    return BuildData(calibration=calib, validation=val)
