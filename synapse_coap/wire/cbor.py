"""Minimal CBOR (RFC 8949) primitives used by the body codec.

Only what the body codec needs: definite-length items, shortest argument
encoding, shortest *exact* float encoding.  The decoder side lives in
:mod:`synapse_coap.wire.body` because it interprets the profile's tags and
simple values while it walks (iteratively, with caps checked before any
allocation).
"""

from __future__ import annotations

import math
import struct

from synapse_coap.errors import RemoteProtocolError

MAJOR_UINT = 0
MAJOR_NEGINT = 1
MAJOR_BYTES = 2
MAJOR_TEXT = 3
MAJOR_ARRAY = 4
MAJOR_MAP = 5
MAJOR_TAG = 6
MAJOR_SIMPLE = 7

FALSE = b"\xf4"
TRUE = b"\xf5"
NULL = b"\xf6"


def head(major: int, arg: int) -> bytes:
    """The initial byte(s) of an item: major type + shortest argument (0 <= arg < 2**64)."""
    m = major << 5
    if arg < 24:
        return bytes((m | arg,))
    if arg < 0x100:
        return bytes((m | 24, arg))
    if arg < 0x10000:
        return bytes((m | 25,)) + arg.to_bytes(2, "big")
    if arg < 0x100000000:
        return bytes((m | 26,)) + arg.to_bytes(4, "big")
    return bytes((m | 27,)) + arg.to_bytes(8, "big")


def encode_float(x: float) -> bytes:
    """The shortest of half/single/double precision that gives back exactly ``x``."""
    if math.isnan(x):
        return b"\xf9\x7e\x00"
    exact = struct.pack(">d", x)
    for fmt, initial in ((">e", 0xF9), (">f", 0xFA)):
        try:
            short = struct.pack(fmt, x)
        except OverflowError:
            continue
        if struct.pack(">d", struct.unpack(fmt, short)[0]) == exact:
            return bytes((initial,)) + short
    return b"\xfb" + exact


def decode_float(size: int, raw: bytes) -> float:
    fmt = {2: ">e", 4: ">f", 8: ">d"}[size]
    value: float = struct.unpack(fmt, raw)[0]
    return value


def read_head(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """Read one item head at ``pos``: (major, additional info, argument, new pos).

    For major 7 with additional info 25/26/27 the argument is the raw float's
    byte size and the float bytes are *not* consumed.  Indefinite lengths and
    the reserved additional-info values 28-30 raise RemoteProtocolError.
    """
    end = len(data)
    if pos >= end:
        raise RemoteProtocolError("CBOR body truncated")
    ib = data[pos]
    pos += 1
    major = ib >> 5
    info = ib & 0x1F
    if info < 24:
        return major, info, info, pos
    if info >= 28:
        raise RemoteProtocolError(f"unsupported CBOR initial byte 0x{ib:02x}")
    size = 1 << (info - 24)
    if major == MAJOR_SIMPLE and info > 24:
        return major, info, size, pos
    if pos + size > end:
        raise RemoteProtocolError("CBOR body truncated")
    arg = int.from_bytes(data[pos : pos + size], "big")
    return major, info, arg, pos + size
