"""One reader for the YAML files users write (build config, hardware profile, agent config): every way the file
can be wrong is one line of the caller's error class naming the file, and the line for a YAML syntax error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgepack.errors import ConfigError, EdgepackError


def read_yaml_mapping(path: Path, what: str, *, error: type[EdgepackError] = ConfigError,
                      missing_hint: str = "") -> dict[str, Any]:
    """The top-level mapping of the YAML file at `path`; `what` names the file in messages ("config", "profile")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist{missing_hint}", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}", path=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{what} {path}: not valid YAML{where}", path=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{what} {path}: expected a mapping at the top level", path=path)
    return data
