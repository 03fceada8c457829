"""Service functions without HTTP: range parsing, selectors, labels, audit paging."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError, RangeNotSatisfiable
from fleet.db import make_engine, make_session_factory, migrate
from fleet.services import audit
from fleet.services.bundles import ByteRange, parse_range, range_applies
from fleet.services.devices import matches, parse_selector, validate_labels

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("bytes=0-99", (0, 99)),
        ("bytes=500-", (500, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),  # a suffix longer than the file is the whole file
        ("bytes=990-5000", (990, 999)),  # an end past the file is clamped
        ("bytes=999-999", (999, 999)),
        (" bytes = 10-19 ", (10, 19)),
        ("bytes=0-1,5-6", None),  # several ranges: send the whole file (RFC 9110 allows ignoring Range)
        ("items=0-10", None),  # another unit
        ("bytes=abc", None),  # malformed
        ("bytes=-", None),
        ("bytes=20-10", None),  # last < first is invalid, not unsatisfiable
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    result = parse_range(header, SIZE)
    if expected is None:
        assert result is None
    else:
        assert result == ByteRange(expected[0], expected[1], SIZE)


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, SIZE)
    assert info.value.http_status == 416 and info.value.size == SIZE


def test_if_range_needs_the_strong_etag() -> None:
    bundle_id = "ab" * 32
    assert range_applies(None, bundle_id)
    assert range_applies(f'"{bundle_id}"', bundle_id)
    assert not range_applies('"other"', bundle_id)
    assert not range_applies("Wed, 21 Oct 2015 07:28:00 GMT", bundle_id)


def test_selectors() -> None:
    assert parse_selector("site=a, tier=edge") == {"site": "a", "tier": "edge"}
    assert parse_selector("") == {} and parse_selector(None) == {}
    assert parse_selector({"site": "a"}) == {"site": "a"}
    assert matches({"site": "a", "tier": "edge"}, {"site": "a"})
    assert not matches({"site": "b"}, {"site": "a"})
    assert not matches({}, {"site": "a"})
    assert matches({}, {})
    for bad in ("site", "site=a=b", "=a", "site=a,site=b", "s/te=a b"):
        with pytest.raises(ConfigError):
            parse_selector(bad)


def test_label_values_cannot_carry_selector_syntax() -> None:
    assert validate_labels({"zone": "eu-west.1", "k8s.io/role": "edge"}) == {"zone": "eu-west.1",
                                                                             "k8s.io/role": "edge"}
    for bad in ({"site": "a,b"}, {"site": "a=b"}, {"": "x"}, {"site": 3}):
        with pytest.raises(ConfigError):
            validate_labels(bad)


def test_audit_records_in_the_callers_transaction_and_pages_newest_first(db_url: str) -> None:
    unique = f"t{secrets.token_hex(4)}"  # action names are at most 64 characters
    engine = make_engine(db_url)
    try:
        migrate(engine)
        sessions = make_session_factory(engine)
        with sessions() as session:
            audit.record(session, "token:t", f"{unique}.dropped", "x")
            session.rollback()  # not committed → not recorded
            for index in range(5):
                audit.record(session, "token:t", f"{unique}.step", str(index), {"index": index})
            session.commit()
        with sessions() as session:
            assert audit.list_entries(session, action=f"{unique}.dropped") == []
            newest = audit.list_entries(session, action=f"{unique}.", limit=2)
            assert [e.target for e in newest] == ["4", "3"]
            older = audit.list_entries(session, action=f"{unique}.step", before_id=newest[-1].id)
            assert [e.target for e in older] == ["2", "1", "0"]
            assert older[0].details == {"index": 2}
    finally:
        engine.dispose()


def test_session_type_is_sqlalchemy(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert isinstance(make_session_factory(engine)(), Session)
    finally:
        engine.dispose()
