"""Strict CoAP message parsing (RFC 7252 3): every message format error is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_coap.transport.datagram import (
    MessageFormatError,
    check_format,
    decode_message,
    reset_for,
)

GET_VERSIONS = bytes.fromhex("4201abcd0102") + b"\xb1_" + b"\x06matrix"


def test_a_good_request_decodes() -> None:
    msg = decode_message(GET_VERSIONS, None)
    assert msg.opt.uri_path == ("_", "matrix")
    assert msg.token == b"\x01\x02" and msg.mid == 0xABCD


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x40\x01", "shorter than"),
        (b"\x80\x01\x00\x01", "version"),
        (bytes([0x49, 1, 0, 1]) + b"\0" * 9, "token length 9"),
        (bytes([0x4F, 1, 0, 1]) + b"\0" * 15, "token length 15"),
        (bytes([0x44, 1, 0, 1]) + b"\0\0", "token truncated"),
        (bytes([0x40, 1, 0, 1, 0xFF]), "payload marker with no payload"),
        (bytes([0x40, 1, 0, 1, 0xB3]) + b"ab", "option value truncated"),
        (bytes([0x40, 1, 0, 1, 0xF0]) + b"x", "reserved"),
        (bytes([0x40, 1, 0, 1, 0x1F]), "reserved"),
        (bytes([0x40, 1, 0, 1, 0xD0]), "option header truncated"),
        (bytes([0x40, 0, 0, 1, 0xFF]) + b"x", "Empty message"),
        (bytes([0x41, 0, 0, 1, 7]), "Empty message"),
        (bytes([0x40, 1, 0, 1, 0xB1, 0xFF]), "does not decode"),  # Uri-Path 0xff
    ],
)
def test_message_format_errors_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(MessageFormatError, match=why):
        decode_message(data, None)


def test_reset_only_for_a_confirmable_message() -> None:
    bad_con = bytes([0x49, 1, 0x12, 0x34]) + b"\0" * 9
    assert reset_for(bad_con) == bytes([0x70, 0, 0x12, 0x34])
    bad_non = bytes([0x59, 1, 0x12, 0x34]) + b"\0" * 9
    assert reset_for(bad_non) is None
    assert reset_for(b"\x40") is None


@given(st.binary(max_size=64))
def test_any_datagram_parses_or_is_a_format_error(data: bytes) -> None:
    try:
        decode_message(data, None)
    except MessageFormatError:
        return
    check_format(data)
