"""The build cache: pass outputs and measurements keyed by the hash of everything that decides them.

A key covers the input model's bytes, the pass and its config, the profile, the data it reads and
the tool versions, so an unchanged rebuild is served from here and any change misses. Entries are
written to a temporary name, fsync'd and renamed (`edgepack.files`), so a killed build or a power cut
never leaves a half entry behind; a failed write removes its temporary files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgepack.files import CHUNK_BYTES, atomic_write, atomic_writer, fsync_dir


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
        """The cached main model file of a pass (its sidecar files lie beside it) and the pass info."""
        if not self.enabled:
            return None
        entry = self.root / "passes" / key
        info_path = entry / "info.json"
        if info_path.is_file():
            try:
                stored = json.loads(info_path.read_text())
            except ValueError:
                return None
            model = entry / stored.get("_model_file", "model.onnx")
            if model.is_file() and all((entry / name).is_file() for name in stored.get("_sidecars", [])):
                self.hits += 1
                info = {k: v for k, v in stored.items() if not k.startswith("_")}
                return model, info
        self.misses += 1
        return None

    def put_model(self, key: str, model_path: Path, info: dict[str, Any], sidecars: list[Path] | None = None) -> Path:
        """Store a pass's main model file, its sidecars (e.g. an IR's .bin) and info; returns the stored main file."""
        if not self.enabled:
            return model_path
        final = self.root / "passes" / key
        name = model_path.name if model_path.suffix != ".onnx" else "model.onnx"
        if final.is_dir():
            return final / name
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        sidecars = list(sidecars or [])
        stored = {**info, "_model_file": name, "_sidecars": [s.name for s in sidecars]}
        try:
            for source, member in [(model_path, name), *((sidecar, sidecar.name) for sidecar in sidecars)]:
                with open(source, "rb") as reader, atomic_writer(staging / member) as writer:
                    shutil.copyfileobj(reader, writer, CHUNK_BYTES)
            atomic_write(staging / "info.json", json.dumps(stored, sort_keys=True, default=str))
            os.replace(staging, final)
            fsync_dir(final.parent)
        except OSError:
            # Unwritable cache, or another build renamed the same entry in first: use what exists.
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():
                return model_path
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final / name

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
        atomic_write(self.root / "results" / f"{key}.json", json.dumps(result, sort_keys=True))
