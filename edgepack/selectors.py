"""Device labels and `k=v,k2=v2` label selectors: one parser for the CLI, the fleet API and rollouts.

    labels = parse_selector("site=lab, tier=edge")     # {"site": "lab", "tier": "edge"}
    matches({"site": "lab", "tier": "edge", "rack": "3"}, labels)   # True: every pair must match
    format_selector(labels)                            # "site=lab,tier=edge" (sorted, canonical)

Label keys are letters, digits, '.', '_', '/', '-' (a letter or digit first, up to 63); values are
letters, digits, '.', '_', ':', '-' (up to 63, may be empty). Neither may hold ',' or '=', so a
selector written from labels always parses back to the same labels. The same text names labels at
enrollment (`--labels`) and picks devices (`--selector`), so one grammar serves both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from edgepack.errors import ConfigError

MAX_LABELS = 64
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._:-]{0,63}$")


def validate_labels(labels: Mapping[str, Any] | None) -> dict[str, str]:
    """Labels as {key: value} strings a selector can name (see the module docstring for the grammar)."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ConfigError("labels must be an object of key → value strings")
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"at most {MAX_LABELS} labels")
    result: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise ConfigError(f"invalid label key {key!r}", label=key)
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise ConfigError(f"invalid value {value!r} for label {key!r}", label=key)
        result[key] = value
    return result


def parse_selector(selector: str | Mapping[str, Any] | None) -> dict[str, str]:
    """`"k=v,k2=v2"` (or a mapping, or None/"" for every device) as validated {key: value} labels."""
    if selector is None:
        return {}
    if isinstance(selector, Mapping):
        return validate_labels(selector)
    pairs: dict[str, str] = {}
    for part in selector.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"selector term {part!r} is not k=v", selector=selector)
        key, value = key.strip(), value.strip()
        if key in pairs and pairs[key] != value:
            raise ConfigError(f"selector names {key} twice with different values", selector=selector)
        pairs[key] = value
    return validate_labels(pairs)


def format_selector(selector: Mapping[str, str]) -> str:
    """The canonical text of a selector: pairs sorted by key."""
    return ",".join(f"{key}={selector[key]}" for key in sorted(selector))


def matches(labels: Mapping[str, Any] | None, selector: Mapping[str, str]) -> bool:
    """True when `labels` has every pair of `selector` (an empty selector matches every device)."""
    labels = labels or {}
    return all(labels.get(key) == value for key, value in selector.items())


__all__ = ["MAX_LABELS", "format_selector", "matches", "parse_selector", "validate_labels"]
