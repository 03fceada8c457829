"""edgepack.selectors: one `k=v,k2=v2` grammar for labels and selectors."""

from __future__ import annotations

import pytest

from edgepack.errors import ConfigError
from edgepack.selectors import MAX_LABELS, format_selector, matches, parse_selector, validate_labels


def test_parse_trims_and_skips_empty_terms() -> None:
    assert parse_selector(" site=lab , tier=edge,, ") == {"site": "lab", "tier": "edge"}
    assert parse_selector("") == {} and parse_selector(None) == {}
    assert parse_selector({"site": "lab"}) == {"site": "lab"}
    assert parse_selector("k8s.io/role=edge,zone=eu-west.1,empty=") == {"k8s.io/role": "edge", "zone": "eu-west.1",
                                                                         "empty": ""}


@pytest.mark.parametrize("text", ["site", "site=a=b", "=a", "site=a,site=b", "s/te=a b", "-site=a"])
def test_malformed_selectors_are_one_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_selector(text)


def test_a_repeated_pair_with_the_same_value_is_fine() -> None:
    assert parse_selector("site=a,site=a") == {"site": "a"}


def test_format_round_trips_sorted() -> None:
    labels = {"tier": "edge", "site": "lab"}
    assert format_selector(labels) == "site=lab,tier=edge"
    assert parse_selector(format_selector(labels)) == labels


def test_every_pair_must_match() -> None:
    assert matches({"site": "a", "tier": "edge"}, {"site": "a"})
    assert not matches({"site": "b"}, {"site": "a"})
    assert not matches(None, {"site": "a"})
    assert matches({}, {}) and matches(None, {})


def test_label_validation_limits() -> None:
    for bad in ({"site": "a,b"}, {"site": "a=b"}, {"": "x"}, {"site": 3}, ["site"],
                {f"k{index}": "v" for index in range(MAX_LABELS + 1)}):
        with pytest.raises(ConfigError):
            validate_labels(bad)
