"""RFC 7252 serialisation: known bytes, malformed input, and the fuzz invariant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.errors import RemoteProtocolError, SynapseCoapError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.messages import CoapMessage, CoapOption
from synapse_coap.wire.profile import load_profile


def test_rfc7252_get_example_bytes() -> None:
    # CON GET /temperature, mid 0x7d34, no token (RFC 7252 appendix A style).
    msg = CoapMessage(n.GET, (CoapOption(n.URI_PATH, b"temperature"),))
    wire = encode_coap(msg, mtype=n.CON, mid=0x7D34)
    assert wire == bytes.fromhex("40017d34") + bytes([0xBB]) + b"temperature"
    assert decode_coap(wire) == (n.CON, 0x7D34, b"", msg)


def test_extended_deltas_lengths_and_payload_round_trip() -> None:
    msg = CoapMessage(
        n.CONTENT,
        (
            CoapOption(n.ETAG, b"12345678"),
            CoapOption(n.URI_PATH, b"x" * 13),
            CoapOption(n.URI_PATH, b"y" * 300),
            CoapOption(n.OPT_HTTP_STATUS, b"\x01\x2c"),
            CoapOption(65535, b""),
        ),
        b"\x00payload",
    )
    wire = encode_coap(msg, mtype=n.ACK, mid=65535, token=b"\x01\x02")
    assert decode_coap(wire) == (n.ACK, 65535, b"\x01\x02", msg)


def test_options_are_sorted_keeping_repeat_order() -> None:
    msg = CoapMessage(
        n.GET,
        (
            CoapOption(n.URI_QUERY, b"b"),
            CoapOption(n.URI_PATH, b"a"),
            CoapOption(n.URI_QUERY, b"a"),
        ),
    )
    _t, _m, _tok, back = decode_coap(encode_coap(msg))
    assert [o.value for o in back.options] == [b"a", b"b", b"a"]


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x40\x01\x00",  # short header
        b"\x80\x01\x00\x00",  # version 2
        b"\x49\x01\x00\x00" + b"\x00" * 9,  # token length 9
        b"\x42\x01\x00\x00\x01",  # token truncated
        b"\x40\x01\x00\x00\xff",  # payload marker, empty payload
        b"\x40\x01\x00\x00\xf0",  # delta 15
        b"\x40\x01\x00\x00\x0f",  # length 15
        b"\x40\x01\x00\x00\xd1",  # extended delta truncated
        b"\x40\x01\x00\x00\x15ab",  # value truncated
        b"\x40\x00\x00\x00\x00",  # empty message with a byte after the header
        b"\x40\x01\x00\x00" + b"\xe0\xff\xff",  # option number above 65535
    ],
)
def test_malformed_messages_raise_remote_protocol_error(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_coap(wire)


def test_private_option_bits_follow_rfc7252_5_4_6() -> None:
    elective = {n.OPT_HTTP_STATUS, n.OPT_HEADER, n.OPT_TOKEN_RESET, n.OPT_STRING_RESET}
    for number in n.PRIVATE_OPTIONS:
        assert 65000 <= number <= 65535
        assert not n.is_no_cache_key(number)
        if number in elective:
            assert not n.is_critical(number) and not n.is_unsafe(number)
        else:
            assert n.is_critical(number) and n.is_unsafe(number)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    try:
        mtype, mid, token, msg = decode_coap(data)
    except RemoteProtocolError:
        return
    # What parses re-encodes to the same bytes (the format has one encoding).
    assert encode_coap(msg, mtype=mtype, mid=mid, token=token) == data


options = st.lists(
    st.builds(CoapOption, st.integers(0, 65535), st.binary(max_size=600)), max_size=8
)


#: option numbers a request's decoding reads: Uri-Path, Content-Format, Uri-Query, Accept,
#: the codec's Header, Target, Token-Ref and No-Auth
_INDEXED = (11, 12, 15, 17, n.OPT_HEADER, n.OPT_TARGET, n.OPT_TOKEN_REF, n.OPT_NO_AUTH)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255),
    options,
    st.binary(max_size=100),
    st.integers(0, 3),
    st.integers(0, 65535),
    st.binary(max_size=8),
)
def test_any_message_round_trips(
    code: int, opts: list[CoapOption], payload: bytes, mtype: int, mid: int, token: bytes
) -> None:
    if code == 0:
        opts, payload, token = [], b"", b""
    msg = CoapMessage(code, tuple(sorted(opts, key=lambda o: o.number)), payload)
    assert decode_coap(encode_coap(msg, mtype=mtype, mid=mid, token=token)) == (
        mtype,
        mid,
        token,
        msg,
    )


def test_option_lookups_follow_the_options_and_hand_out_copies() -> None:
    """``get``/``first`` read an index built on the first lookup: values in order, a new
    list each time (changing it changes nothing), equality and hashing unaffected."""
    from synapse_coap.mapping.messages import CoapMessage, CoapOption

    cm = CoapMessage(1, (CoapOption(11, b"a"), CoapOption(11, b"b"), CoapOption(15, b"q")))
    twin = CoapMessage(1, cm.options)
    assert cm.get(11) == [b"a", b"b"] and cm.get(15) == [b"q"] and cm.get(12) == []
    assert cm.first(11) == b"a" and cm.first(12) is None
    got = cm.get(11)
    got.append(b"x")
    assert cm.get(11) == [b"a", b"b"]
    assert cm == twin and hash(cm) == hash(twin)  # (twin has no index yet)
    assert "by_number" not in repr(cm)
    import attrs

    assert attrs.evolve(cm, code=2).get(15) == [b"q"]


#: option numbers a request's decoding reads: Uri-Path, Content-Format, Uri-Query, Accept,
#: the codec's Header, Target, Token-Ref and No-Auth
_INDEXED = (11, 12, 15, 17, n.OPT_HEADER, n.OPT_TARGET, n.OPT_TOKEN_REF, n.OPT_NO_AUTH)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_INDEXED), st.binary(max_size=4)),
        max_size=8,
    )
)
def test_the_options_index_is_what_get_reads(pairs: list[tuple[int, bytes]]) -> None:
    """``options_index`` (what the compiled codec reads a request's options through) holds,
    for every option number present, exactly ``get``'s values, and no absent number; reading
    a request through it leaves the codec's shared empty list empty."""
    from synapse_coap.mapping import codec as codec_module

    cm = CoapMessage(1, tuple(CoapOption(k, v) for k, v in sorted(pairs, key=lambda p: p[0])))
    index = cm.options_index()
    assert set(index) == {k for k, _ in pairs}
    for k in _INDEXED:
        assert index.get(k, []) == cm.get(k)
    assert cm.options_index() is index
    try:
        codec_module.WireCodec(load_profile(1)).decode_request(cm)
    except SynapseCoapError:
        pass
    assert codec_module._NO_VALUES == []
