"""The build cache: pass outputs and measurements keyed by the hash of everything that decides them.

A key covers the input model's bytes, the pass and its config, the profile, the data it reads and
the tool versions, so an unchanged rebuild is served from here and any change misses. Entries are
written to a temporary name and renamed, so a killed build never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    explicit = os.environ.get("EDGEPACK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack"


def cache_key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class BuildCache:
    """Content-addressed store of pass outputs (model + info) and JSON results."""

    def __init__(self, root: Path | None, enabled: bool = True) -> None:
        self.root = root or default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def get_model(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        if not self.enabled:
            return None
        entry = self.root / "passes" / key
        model, info = entry / "model.onnx", entry / "info.json"
        if model.is_file() and info.is_file():
            try:
                data = json.loads(info.read_text())
            except ValueError:
                return None
            self.hits += 1
            return model, data
        self.misses += 1
        return None

    def put_model(self, key: str, model_path: Path, info: dict[str, Any]) -> Path:
        if not self.enabled:
            return model_path
        final = self.root / "passes" / key
        if final.is_dir():
            return final / "model.onnx"
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            shutil.copyfile(model_path, staging / "model.onnx")
            (staging / "info.json").write_text(json.dumps(info, sort_keys=True, default=str))
            os.replace(staging, final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():
                return model_path
        return final / "model.onnx"

    def get_result(self, key: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        path = self.root / "results" / f"{key}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put_result(self, key: str, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.root / "results" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(result, handle, sort_keys=True)
        os.replace(tmp, path)
