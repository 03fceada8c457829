"""Integers a device sends are stored in 32-bit (and 64-bit) columns: decode refuses what they cannot hold, so a
forged or broken message is one counted ProtocolError, never a database error in the fleet's bridge."""

from __future__ import annotations

import json
import math

import pytest

from edgepack.errors import ProtocolError
from edgepack.protocol import MAX_STORED_INT, SCHEMA_VERSION, DeviceStatus, Telemetry, decode


def _status(**fields) -> bytes:
    return json.dumps({"schema_version": SCHEMA_VERSION, "device_id": "cam-1", **fields}).encode()


def _telemetry(**fields) -> bytes:
    return _status(window_s=1.0, inferences=10, errors=0, **fields)


def test_the_largest_storable_values_decode():
    assert decode(DeviceStatus, _status(seq=MAX_STORED_INT, refused_seq=MAX_STORED_INT)).seq == MAX_STORED_INT
    window = decode(Telemetry, _telemetry(rss_bytes=2**40, latency_ms={"bounds_ms": [1.0], "counts": [MAX_STORED_INT, 0]}))
    assert window.rss_bytes == 2**40 and window.latency_ms.counts == [MAX_STORED_INT, 0]


@pytest.mark.parametrize("model,payload,field", [
    (DeviceStatus, _status(seq=MAX_STORED_INT + 1), "seq"),
    (DeviceStatus, _status(refused_seq=2**64), "refused_seq"),
    (Telemetry, _status(window_s=1.0, inferences=2**63, errors=0), "inferences"),
    (Telemetry, _status(window_s=1.0, inferences=1, errors=MAX_STORED_INT + 1), "errors"),
    (Telemetry, _telemetry(rss_bytes=2**63), "rss_bytes"),
    (Telemetry, _telemetry(rss_bytes=-1), "rss_bytes"),
    (Telemetry, _telemetry(latency_ms={"bounds_ms": [1.0], "counts": [-1, 0]}), "counts"),
])
def test_integers_beyond_the_columns_are_a_protocol_error_naming_the_field(model, payload, field):
    with pytest.raises(ProtocolError, match=field):
        decode(model, payload)


@pytest.mark.parametrize("payload,reason", [
    (json.dumps({"device_id": "cam-1", "window_s": 1.0, "inferences": 1, "errors": 0}).encode(),
     "unknown schema_version None"),  # the field has a default; a message must still name its version
    (json.dumps({"schema_version": "1", "device_id": "cam-1", "window_s": 1.0, "inferences": 1, "errors": 0}).encode(),
     "unknown schema_version '1'"),
    (b"[1, 2]", "payload is not a JSON object"),
    (b"{not json", "payload is not valid JSON"),
])
def test_decode_refuses_in_the_protocol_s_words_what_its_fast_path_lets_pass_or_fail(payload, reason):
    # decode tries pydantic's JSON parser first (a valid message), then parses a failure again to say why
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode(Telemetry, payload)
    # a NaN token (json.dumps writes one) decodes as it did through json.loads; the fleet stores it as null
    assert math.isnan(decode(Telemetry, _telemetry(drift={"input": float("nan")})).drift["input"])
