"""The native build's DEFLATE with a preset dictionary (synapse_coap/wire/_cdeflate.c):
zlib's own bytes (the same library and calls as ``deflate._deflate``'s primed
compressor through zlib's module), whatever the dictionary, window, memLevel and the
order they come in (its copies share one arena, grown on demand; its primed
compressors are bounded).

It runs here in both test runs: from the native build, and on the plain-Python sources
(SYNAPSE_COAP_PURE=1, where the package cannot import it) loaded from its extension.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.wire import deflate
from synapse_coap.wire.body_encode import _encode_cbor
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.deflate import C_DEFLATE_MAX, deflate_mem_level, deflate_window_bits
from synapse_coap.wire.profile import load_profile, profile_ids
from tests.harness.cbody_fuzz import c_module
from tests.harness.corpus import json_bodies

_NAME = "synapse_coap.wire._cdeflate"
PROFILES = [load_profile(p) for p in profile_ids() if p > 0]


@pytest.fixture(scope="module")
def cdeflate() -> Any:
    return c_module(_NAME, deflate._CDEFLATE)


def _zlib(data: bytes, zdict: bytes, wbits: int, mem_level: int) -> bytes:
    """What zlib's module gives (a fresh compressor, level 9, raw DEFLATE)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -wbits, mem_level, zlib.Z_DEFAULT_STRATEGY, zdict)
    return c.compress(data) + c.flush()


def _sizes(data: bytes, zdict: bytes) -> tuple[int, int]:
    return deflate_window_bits(len(zdict) + len(data)), deflate_mem_level(len(data))


def test_same_bytes_as_zlibs_module_on_the_corpora(cdeflate: Any) -> None:
    contexts = (WireContext(), WireContext(server_names=("example.org", "matrix.org")))
    checked = 0
    for profile in PROFILES:
        for context in contexts:
            for body in json_bodies():
                raw = _encode_cbor(body, profile, context)
                wbits, level = _sizes(raw, profile.dictionary)
                out = cdeflate.deflate_dict(raw, profile.dictionary, wbits, level)
                assert out == _zlib(raw, profile.dictionary, wbits, level), body
                checked += 1
    assert checked > 1000


def test_the_encoder_uses_it_for_small_bodies_where_the_build_runs() -> None:
    profile = PROFILES[0]
    raw = _encode_cbor(
        {"user_id": "@someone:example.org", "is_guest": False}, profile, WireContext()
    )
    wbits, level = _sizes(raw, profile.dictionary)
    expected = _zlib(raw, profile.dictionary, wbits, level)
    calls: list[int] = []
    real = deflate._CDEFLATE
    if real is None:  # the plain-Python sources: zlib's module, the same bytes
        assert deflate._deflate(raw, profile.dictionary) == expected
        return

    class Counting:
        def deflate_dict(self, *args: Any) -> bytes:
            calls.append(len(args[0]))
            out: bytes = real.deflate_dict(*args)
            return out

    deflate._CDEFLATE = Counting()
    try:
        assert deflate._deflate(raw, profile.dictionary) == expected
        big = bytes(range(256)) * (C_DEFLATE_MAX // 256 + 1)
        wbits, level = _sizes(big, profile.dictionary)
        assert deflate._deflate(big, profile.dictionary) == _zlib(
            big, profile.dictionary, wbits, level
        )
        # a push base (keep=False) is new each time: zlib's module
        deflate._deflate(raw, b"a base" * 10, keep=False)
    finally:
        deflate._CDEFLATE = real
    assert calls == [len(raw)]  # neither the large body nor the push base


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=5000),
    zdict=st.sampled_from([p.dictionary for p in PROFILES]) | st.binary(min_size=1, max_size=9000),
    wbits=st.integers(9, 15),
    mem_level=st.integers(1, 9),
)
def test_any_body_dictionary_window_and_mem_level(
    cdeflate: Any, data: bytes, zdict: bytes, wbits: int, mem_level: int
) -> None:
    expected = _zlib(data, zdict, wbits, mem_level)
    assert cdeflate.deflate_dict(data, zdict, wbits, mem_level) == expected
    # again, from a memoryview: the primed compressor was copied, not consumed
    assert cdeflate.deflate_dict(memoryview(data), zdict, wbits, mem_level) == expected
    inflate = zlib.decompressobj(-15, zdict=zdict)
    assert inflate.decompress(expected) == data


def test_the_arena_grows_and_small_copies_still_fit(cdeflate: Any) -> None:
    zdict = PROFILES[0].dictionary
    body = b"some body bytes " * 40
    cdeflate.forget()
    assert cdeflate.arena_size() == (0, 0)
    small = cdeflate.deflate_dict(body, zdict, 12, 1)
    first, _ = cdeflate.arena_size()
    large = cdeflate.deflate_dict(body, zdict, 15, 9)  # window and tables at their largest
    grown, primed = cdeflate.arena_size()
    assert grown > first and primed == 2
    assert cdeflate.deflate_dict(body, zdict, 12, 1) == small == _zlib(body, zdict, 12, 1)
    assert large == _zlib(body, zdict, 15, 9)
    assert cdeflate.arena_size()[0] == grown  # never shrinks, never regrows for less


def test_the_primed_compressors_are_bounded(cdeflate: Any) -> None:
    cdeflate.forget()
    body = b"the same body for every dictionary"
    for i in range(40):
        zdict = f"dictionary number {i} ".encode() * 20
        assert cdeflate.deflate_dict(body, zdict, 12, 5) == _zlib(body, zdict, 12, 5)
        assert 1 <= cdeflate.arena_size()[1] <= 16
    # a dictionary with the same bytes in another object finds its primed compressor
    zdict = b"x" * 100 + b"y" * 100
    cdeflate.deflate_dict(body, zdict, 12, 5)
    kept = cdeflate.arena_size()[1]
    assert cdeflate.deflate_dict(body, bytes(bytearray(zdict)), 12, 5) == _zlib(body, zdict, 12, 5)
    assert cdeflate.arena_size()[1] == kept


@pytest.mark.parametrize(
    "args",
    [
        (b"data", b"dict", 8, 5),
        (b"data", b"dict", 16, 5),
        (b"data", b"dict", 12, 0),
        (b"data", b"dict", 12, 10),
        (b"data", b"", 12, 5),
    ],
)
def test_out_of_range_arguments_are_refused(cdeflate: Any, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="window bits 9-15, memLevel 1-9"):
        cdeflate.deflate_dict(*args)


def test_wrong_types_are_refused(cdeflate: Any) -> None:
    with pytest.raises(TypeError):
        cdeflate.deflate_dict("text", b"dict", 12, 5)
    with pytest.raises(TypeError):
        cdeflate.deflate_dict(b"data", bytearray(b"dict"), 12, 5)


# --- inflate_dict: zlib's module's decompressobj(-15, zdict).decompress(data, max_length) ---


def _zlib_inflate(data: bytes, zdict: bytes, max_length: int) -> tuple[bytes, bool, int] | str:
    """What zlib's module gives (output, eof, len(unused_data)), or its error's text."""
    d = zlib.decompressobj(-15, zdict=zdict) if zdict else zlib.decompressobj(-15)
    try:
        out = d.decompress(data, max_length)
    except zlib.error as e:
        return str(e)
    return out, d.eof, len(d.unused_data)


def _c_inflate(cdeflate: Any, data: bytes, zdict: bytes, max_length: int) -> Any:
    try:
        out, ended, unused = cdeflate.inflate_dict(data, zdict, max_length)
    except ValueError as e:
        return str(e)
    return out, bool(ended), unused


def test_inflate_same_as_zlibs_module_on_the_corpora(cdeflate: Any) -> None:
    checked = 0
    for profile in PROFILES:
        for body in json_bodies():
            raw = _encode_cbor(body, profile, WireContext())
            for zdict in (profile.dictionary, b""):
                wbits, level = _sizes(raw, zdict)
                stream = _zlib(raw, zdict, wbits, level) if zdict else deflate._deflate(raw, b"")
                for cap in (len(raw) + 1, len(raw), max(1, len(raw) // 2)):
                    for data in (stream, stream[:-1], stream + b"\x00tail"):
                        got = _c_inflate(cdeflate, data, zdict, cap)
                        assert got == _zlib_inflate(data, zdict, cap), (body, cap)
                checked += 1
    assert checked > 1000


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=3000),
    zdict=st.sampled_from([p.dictionary for p in PROFILES] + [b""]) | st.binary(max_size=300),
    cut=st.integers(0, 40),
    flip=st.integers(0, 10_000),
    cap=st.integers(1, 8000),
    junk=st.binary(max_size=600),
)
def test_inflate_any_stream_cut_flipped_or_junk(
    cdeflate: Any, body: bytes, zdict: bytes, cut: int, flip: int, cap: int, junk: bytes
) -> None:
    args = (9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY)
    c = zlib.compressobj(*args, zdict) if zdict else zlib.compressobj(*args)
    stream = c.compress(body) + c.flush()
    flipped = bytearray(stream)
    if flipped:
        flipped[flip % len(flipped)] ^= 1 << (flip % 8)
    for data in (stream, stream[: max(0, len(stream) - cut)], bytes(flipped), stream + junk, junk):
        # again and again on the one kept stream: no state carried from a body to the next
        for _ in range(2):
            assert _c_inflate(cdeflate, data, zdict, cap) == _zlib_inflate(data, zdict, cap)


def test_inflate_keeps_one_stream_and_forget_drops_it(cdeflate: Any) -> None:
    zdict = PROFILES[0].dictionary
    raw = b"a body " * 50
    stream = _zlib(raw, zdict, 15, 9)
    cdeflate.forget()
    assert cdeflate.inflate_dict(stream, zdict, 10_000) == (raw, 1, 0)
    # a corrupt stream leaves the kept one usable for the next body
    with pytest.raises(ValueError, match="Error -3 while decompressing data"):
        cdeflate.inflate_dict(b"\xff" + stream, zdict, 10_000)
    assert cdeflate.inflate_dict(stream, zdict, 10_000) == (raw, 1, 0)
    cdeflate.forget()
    assert cdeflate.inflate_dict(stream, zdict, 10) == (raw[:10], 0, 0)


def test_inflate_refuses_bad_arguments(cdeflate: Any) -> None:
    with pytest.raises(ValueError, match="max_length"):
        cdeflate.inflate_dict(b"data", b"", 0)
    with pytest.raises(TypeError):
        cdeflate.inflate_dict("text", b"", 10)
    with pytest.raises(TypeError):
        cdeflate.inflate_dict(b"data", bytearray(b"dict"), 10)


def test_the_decoder_inflates_in_c_where_the_build_runs() -> None:
    zdict = PROFILES[0].dictionary
    raw = b"a body " * 50
    stream = _zlib(raw, zdict, 15, 9)
    real = deflate._CDEFLATE
    if real is None:  # the plain-Python sources: zlib's module
        assert deflate.inflate(stream, zdict, 1000) == (raw, True, False)
        return
    calls: list[int] = []

    class Counting:
        def inflate_dict(self, *args: Any) -> Any:
            calls.append(len(args[0]))
            return real.inflate_dict(*args)

    deflate._CDEFLATE = Counting()
    try:
        assert deflate.inflate(stream, zdict, 1000) == (raw, True, False)
        assert deflate.inflate(stream + b"x", zdict, 1000) == (raw, True, True)
        assert deflate.inflate(stream[:-2], zdict, 1000)[1:] == (False, False)
        noise = random.Random(1).randbytes(deflate.C_INFLATE_MAX + 100)
        big = zlib.compressobj(9, zlib.DEFLATED, -15)
        big_stream = big.compress(noise) + big.flush()
        assert len(big_stream) > deflate.C_INFLATE_MAX
        assert deflate.inflate(big_stream, b"", 20_000)[0] == noise
    finally:
        deflate._CDEFLATE = real
    assert calls == [len(stream), len(stream) + 1, len(stream) - 2]  # not the large one


# --- cannot_shrink: deflate.python_cannot_shrink in C ----------------------------------


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=70)
    | st.lists(st.sampled_from(b"ab\x00\xa1\xff"), max_size=70).map(bytes)
    | st.binary(min_size=32, max_size=32).map(lambda h: b"\xa1\x29\xa1\xc6\x58\x20" + h + b"\xa0"),
    zdict=st.sampled_from([p.dictionary for p in PROFILES] + [b"", b"a", b"ab"])
    | st.binary(max_size=300),
    cut=st.integers(0, 5000),
    size=st.integers(0, 10),
)
def test_cannot_shrink_same_as_the_reference(
    cdeflate: Any, data: bytes, zdict: bytes, cut: int, size: int
) -> None:
    piece = zdict[cut % max(1, len(zdict)) :][:size]
    for body in (data, piece + data, data[:20] + piece + data[20:], data + piece):
        assert cdeflate.cannot_shrink(body, zdict) == deflate.python_cannot_shrink(body, zdict), (
            body.hex(),
            zdict[:16].hex(),
            len(zdict),
        )


def test_cannot_shrink_corpus_answers_and_large_dictionaries(cdeflate: Any) -> None:
    for profile in PROFILES:
        for body in json_bodies():
            raw = _encode_cbor(body, profile, WireContext())[:80]
            for zdict in (profile.dictionary, b""):
                assert cdeflate.cannot_shrink(raw, zdict) == deflate.python_cannot_shrink(
                    raw, zdict
                )
    # a dictionary with more 3-byte sequences than the C table holds: nothing proven
    big = random.Random(2).randbytes(9000)
    body = random.Random(3).randbytes(40)
    assert deflate.python_cannot_shrink(body, big) in (True, False)
    assert cdeflate.cannot_shrink(body, big) is False
    with pytest.raises(TypeError):
        cdeflate.cannot_shrink(bytearray(b"data"), b"")
