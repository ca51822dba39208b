"""The body codec's DEFLATE runs (raw DEFLATE, level 9, with or without a preset
dictionary): zlib's window and memLevel sized to each body, a compressor primed once per
profile dictionary and copied for each body, in C where the native build runs
(``wire/_cdeflate.c``, the same zlib calls and bytes). Used by
:mod:`synapse_coap.wire.body_encode`; ``tests/unit/test_body_deflate.py`` and
``tests/unit/test_cdeflate.py`` hold it to zlib's own bytes."""

from __future__ import annotations

import importlib
import zlib
from typing import Any, cast

try:  # DEFLATE with a profile dictionary in C (wire/_cdeflate.c: zlib's calls and bytes)
    _CDEFLATE: Any = importlib.import_module("synapse_coap.wire._cdeflate")
except ImportError:  # no native build, or SYNAPSE_COAP_PURE=1
    _CDEFLATE = None


#: the memLevel of a DEFLATE run is the smallest of these that holds the whole body in
#: one block's symbol buffer (see :func:`deflate_mem_level`)
MIN_MEM_LEVEL = 5
MAX_MEM_LEVEL = 9


def deflate_mem_level(size: int) -> int:
    """zlib's memLevel for a body of ``size`` bytes: the smallest (from
    :data:`MIN_MEM_LEVEL`) whose symbol buffer, ``2 ** (memLevel + 6)`` entries, holds
    more symbols than the body has bytes, up to 9 (zlib's largest).

    The memLevel sizes only two things in zlib's deflate: the symbol buffer, which ends
    a block when it fills (so with room for every byte there is one block, as with
    memLevel 9 for anything under 32 KiB), and the hash table of 3-byte prefixes
    (``2 ** (memLevel + 7)`` heads), which zlib clears on every new stream: 128 KiB
    at memLevel 9 for each answer of a few dozen bytes. In a homeserver that cost
    some 30-70 us of CPU per small request (``bench/inbound.py``, side by side; much
    more than the compression itself takes in a loop, so probably by evicting the
    homeserver's own data from the CPU cache). A smaller table only adds hash collisions to the match
    chains, which the match search skips, so the output is the same except where a
    chain is long enough to reach zlib's chain limit (1024 or 4096 entries, highly
    repetitive input); every body of the corpora compresses to the same bytes
    (``tests/unit/test_body_deflate.py``), and any output inflates to the same body.
    """
    return min(MAX_MEM_LEVEL, max(MIN_MEM_LEVEL, (size + 1).bit_length() - 6))


#: zlib's MIN_LOOKAHEAD: a match may reach back at most window size minus this
_MIN_LOOKAHEAD = 262
MIN_WINDOW_BITS = 9
MAX_WINDOW_BITS = 15


def deflate_window_bits(history: int) -> int:
    """zlib's window bits for a stream whose preset dictionary and body are ``history``
    bytes together: the smallest window (from 2**9) that every match distance fits in,
    up to 2**15 (zlib's largest).

    While the whole history fits, the window size changes nothing in what deflate
    finds (no byte slides out, no distance is out of reach, the hash chains are those
    of the memLevel), so the output is that of a 32 KiB window; any window inflates
    with the receiver's 32 KiB one. What it changes is the cost: zlib allocates and
    clears two buffers of twice the window for every stream, and at 32 KiB those
    went beyond what the allocator reuses: a fresh stream for a 300-byte answer cost
    67 us against 26 us at 16 KiB (and 13 us copying a primed one, below).
    """
    need = history + _MIN_LOOKAHEAD
    return min(MAX_WINDOW_BITS, max(MIN_WINDOW_BITS, (need - 1).bit_length()))


#: (dictionary, window bits, memLevel) -> a compressor primed with the dictionary, copied
#: for each body: the dictionary's hash chains are built once, not per body. Only the
#: profile dictionaries are kept (a push notification's base dictionary is new each
#: time); a few profiles x window sizes x memLevels, bounded by _PRIMED_MAX anyway.
_PRIMED: dict[tuple[bytes, int, int], Any] = {}
_PRIMED_MAX = 64


#: the longest body :func:`cannot_shrink` may rule on (see there)
LITERAL_ONLY_MAX = 9

#: the 3-byte sequences of each preset dictionary seen (as ``b0 << 16 | b1 << 8 | b2``),
#: for :func:`cannot_shrink`: a few profile dictionaries, bounded like _PRIMED
_TRIGRAMS: dict[bytes, frozenset[int]] = {}


def _trigrams(zdict: bytes) -> frozenset[int]:
    found = _TRIGRAMS.get(zdict)
    if found is None:
        if len(_TRIGRAMS) >= _PRIMED_MAX:
            _TRIGRAMS.clear()
        found = _TRIGRAMS[zdict] = frozenset(
            zdict[i] << 16 | zdict[i + 1] << 8 | zdict[i + 2] for i in range(len(zdict) - 2)
        )
    return found


def cannot_shrink(data: bytes, zdict: bytes) -> bool:
    """True when no raw DEFLATE stream of ``data`` (preset dictionary ``zdict``) can be
    shorter than ``len(data) - 1`` bytes, so a body form that costs a marker byte on
    top never beats the body itself: the encoder then skips the DEFLATE run (a tiny
    answer's: 2.3 us back to back, 20-45 us with the data caches cold as in a
    homeserver, ``bench/cold_codec.py``) and the wire bytes are the same.

    A proof, not a guess. Up to :data:`LITERAL_ONLY_MAX` bytes, and only when no byte
    of ``data`` can be part of a match: a match is at least 3 bytes long and copies
    from earlier in the window (the dictionary, then ``data``: a source may span the
    two), so no byte can be in one when no 3-byte sequence of ``data`` occurs earlier
    in ``zdict + data``. Then every byte is a literal, and a stream costs at least: a
    stored block 3 + 32 + 8n bits; a block with the fixed codes 3 + 8n + 7 (literals
    of 8 or 9 bits, end of block 7); a block with dynamic codes 47 + n + 1 (its
    header: 17 bits, at least four 3-bit lengths of the code-length code, and at least
    18 bits of code lengths: they cover at least 258 entries, 138 at most per 8-bit
    repeat symbol, and the end of block's length and a distance code's are symbols of
    a bit or more; then a bit or more per literal and for the end of block). The least
    of those for n = 5..9 bytes, ``min(10 + 8n, 48 + n)`` bits, is at least n - 1
    bytes.
    ``tests/unit/test_body_deflate.py`` holds zlib to it.
    """
    n = len(data)
    if n > LITERAL_ONLY_MAX:
        return False
    known = _trigrams(zdict) if zdict else frozenset()
    # the dictionary's last two bytes, then ``data``: a sequence starting in ``data``
    # may also occur at one starting before it (within ``data``, or across the two)
    history = zdict[-2:] + data
    first = len(history) - n
    seen: set[int] = set()
    for i in range(len(history) - 2):
        t = history[i] << 16 | history[i + 1] << 8 | history[i + 2]
        if i >= first and (t in known or t in seen):
            return False
        seen.add(t)
    return (min(10 + 8 * n, 48 + n) + 7) // 8 + 1 >= n


#: bodies up to this size go to ``wire/_cdeflate.c``, which holds the GIL throughout (a
#: larger one, encoded on the decode pool, to zlib's module, which lets the loop run)
C_DEFLATE_MAX = 4096


def _deflate(data: bytes, zdict: bytes, keep: bool = True) -> bytes:
    """Raw DEFLATE (level 9) of ``data`` with the preset dictionary ``zdict``.

    ``keep``: the dictionary is a profile's, worth a primed compressor that is copied
    for each body (zlib objects lock themselves, so pool threads may share it)."""
    level = deflate_mem_level(len(data))
    wbits = deflate_window_bits(len(zdict) + len(data))
    if zdict:
        if keep and _CDEFLATE is not None and len(data) <= C_DEFLATE_MAX:
            return cast(bytes, _CDEFLATE.deflate_dict(data, zdict, wbits, level))
        if keep:
            key = (zdict, wbits, level)
            primed = _PRIMED.get(key)
            if primed is None:
                if len(_PRIMED) >= _PRIMED_MAX:
                    _PRIMED.clear()
                primed = _PRIMED[key] = zlib.compressobj(
                    9, zlib.DEFLATED, -wbits, level, zlib.Z_DEFAULT_STRATEGY, zdict
                )
            c = primed.copy()
        else:
            c = zlib.compressobj(9, zlib.DEFLATED, -wbits, level, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(9, zlib.DEFLATED, -wbits, level)
    return c.compress(data) + c.flush()
