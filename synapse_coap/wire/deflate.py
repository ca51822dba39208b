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

from synapse_coap.errors import RemoteProtocolError

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


#: the longest body :func:`cannot_shrink` may rule on (see there): one DEFLATE block
#: (zlib's symbol buffer holds 2,047 symbols at the encoder's least memLevel, 5, and 16,383
#: at 9, so zlib writes a body this short as one block whatever the memLevel)
CANNOT_SHRINK_MAX = 64

#: the bits of a stored block besides its bytes (3 header bits, then LEN and NLEN)
_STORED_BITS = 35
#: the least bits of a block with dynamic codes before its code lengths: 3 header bits,
#: HLIT, HDIST and HCLEN (14), and at least four 3-bit lengths of the code-length code
_DYNAMIC_HEAD_BITS = 29
#: the fixed codes: a literal below 144 is 8 bits, from 144 9 bits; end of block 7 bits;
#: a match at least 12 (a length code of 7 or 8 bits, a distance code of 5)
_FIXED_SPLIT = 144
_FIXED_END_BITS = 7
_FIXED_MATCH_BITS = 12
#: the end-of-block symbol of the literal/length alphabet
_END_OF_BLOCK = 256

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


def _huffman_bits(counts: list[int]) -> int:
    """The bits of ``counts`` (how often each symbol occurs) under an optimal prefix
    code (Huffman's): no prefix code codes them in fewer. A single symbol: a bit each."""
    if len(counts) == 1:
        return counts[0]
    leaves = sorted(counts)
    merged: list[int] = []
    i = j = 0
    total = 0
    for _ in range(len(leaves) - 1):
        pair = 0
        for _ in range(2):
            if j >= len(merged) or (i < len(leaves) and leaves[i] <= merged[j]):
                pair += leaves[i]
                i += 1
            else:
                pair += merged[j]
                j += 1
        merged.append(pair)
        total += pair
    return total


def _code_length_half_bits(used: list[int]) -> int:
    """The least half-bits of a dynamic block's code lengths for the literal/length
    alphabet's entries 0..256, where the symbols ``used`` (sorted, the end of block
    last) have codes; see :func:`cannot_shrink`."""
    half = 0
    previous = -1
    for symbol in used:
        gap = symbol - previous - 1
        if previous < 0:
            # the first entries: zeros (a bit each up to 4 bits) then this symbol starting
            # a run (a bit), or a nonzero run from the first entry (a bit, then half a
            # bit an entry)
            half += 2 + min(gap, 8)
        else:
            # a nonzero run continued (a 16 repeats at most 6 entries for 3 bits: half a
            # bit an entry) through the gap and this symbol, or a zero run (4 bits or
            # more from 4 entries) and this symbol starting a run (a bit)
            half += min(gap + 1, 10)
        previous = symbol
    return half


def cannot_shrink(data: bytes, zdict: bytes) -> bool:
    """:func:`python_cannot_shrink`, in C where the native build runs
    (``wire/_cdeflate.c``: some 10 us less a call than the compiled Python, which
    boxes every 3-byte sequence for the set lookups; False, proving nothing, for a
    dictionary of more than 8,194 bytes, which no profile's is)."""
    if len(data) > CANNOT_SHRINK_MAX:
        return False
    if _CDEFLATE is not None:
        return bool(_CDEFLATE.cannot_shrink(data, zdict))
    return python_cannot_shrink(data, zdict)


def python_cannot_shrink(data: bytes, zdict: bytes) -> bool:
    """True when no one-block raw DEFLATE stream of ``data`` (preset dictionary
    ``zdict``) can be shorter than ``len(data) - 1`` bytes, so a body form that costs a
    marker byte on top never beats the body itself: the encoder then skips the DEFLATE
    run and the wire bytes are the same. zlib writes every body up to
    :data:`CANNOT_SHRINK_MAX` bytes as one block. A ``/send``'s or a sent message's
    answer, whose event id the session string table cannot hold (the server names it
    first), is 37-40 bytes of CBOR, 32 of them the id's hash, which DEFLATE never
    shortens: the run this saves on it costs 4.4 us back to back and 40 us after a sweep
    of the data caches, the proof in C 1.7 and 26 us
    (``bench/results/cold_codec-ef4d088.csv``).

    A proof, not a guess (docs/wire-body.md). A match is at least 3 bytes long and
    copies from earlier in the window (the dictionary, then ``data``: a source may span
    the two), so a match can start at a byte only where its 3-byte sequence occurs
    earlier in ``zdict + data``, and every 3-byte sequence inside a match does too (at
    the source). So the bytes fall into *runs* (positions whose sequences occur
    earlier, with the two bytes after them) that a match may cover, at most one run per
    match, and the rest, which are literals in any stream. Then a block costs at least:

    - stored: 35 bits and 8 a byte;
    - fixed codes: 3 + 7 bits, 8 or 9 bits a literal of the rest, and 12 bits a run
      (a match, or at least two literals of its own);
    - dynamic codes: 29 bits of header; the code lengths of the literal/length
      alphabet's 257 entries, where the rest's byte values and the end of block have
      nonzero lengths: a run of equal nonzero lengths costs a bit to start and half a
      bit an entry after (a repeat symbol copies at most 6 for 3 bits), a run of zeros
      at least a bit an entry up to 4 bits (a "0", a 17, an 18, a "0" and a 16), so a
      gap of ``g`` entries and the nonzero entry after it at least ``min(g + 1, 10)``
      half-bits; the rest's literals and the end of block at least what Huffman's code
      for their counts takes (no prefix code takes less: other symbols in the code only
      lengthen theirs); and 2 bits a run (a match's length and distance symbols, or two
      literals).

    ``tests/unit/test_body_deflate.py`` holds zlib's forms to it.
    """
    n = len(data)
    if n > CANNOT_SHRINK_MAX:
        return False
    known = _trigrams(zdict) if zdict else frozenset()
    # the dictionary's last two bytes, then ``data``: a sequence starting in ``data``
    # may also occur at one starting before it (within ``data``, or across the two)
    history = zdict[-2:] + data
    first = len(history) - n
    seen: set[int] = set()
    coverable = bytearray(n)
    runs = 0
    in_run = False
    for i in range(len(history) - 2):
        t = history[i] << 16 | history[i + 1] << 8 | history[i + 2]
        if i >= first:
            at = i - first
            if t in known or t in seen:
                if not in_run:
                    runs += 1
                    in_run = True
                coverable[at] = coverable[at + 1] = coverable[at + 2] = 1
            else:
                in_run = False
        seen.add(t)
    counts: dict[int, int] = {}
    fixed = 3 + _FIXED_END_BITS + _FIXED_MATCH_BITS * runs
    for at in range(n):
        if not coverable[at]:
            b = data[at]
            counts[b] = counts.get(b, 0) + 1
            fixed += 8 if b < _FIXED_SPLIT else 9
    used = sorted(counts)
    used.append(_END_OF_BLOCK)
    dynamic_half = 2 * (
        _DYNAMIC_HEAD_BITS + _huffman_bits([*counts.values(), 1]) + 2 * runs
    ) + _code_length_half_bits(used)
    least = min(_STORED_BITS + 8 * n, fixed, (dynamic_half + 1) // 2)
    return (least + 7) // 8 + 1 >= n


#: bodies up to this size go to ``wire/_cdeflate.c``, which holds the GIL throughout (a
#: larger one, encoded on the decode pool, to zlib's module, which lets the loop run)
C_DEFLATE_MAX = 4096
#: DEFLATE bodies up to this size are inflated by ``wire/_cdeflate.c`` (the same bound
#: and reason as :data:`C_DEFLATE_MAX`)
C_INFLATE_MAX = 4096


def inflate(data: bytes, zdict: bytes, max_length: int) -> tuple[bytes, bool, bool]:
    """Raw inflate of ``data`` with the preset dictionary ``zdict`` (none if empty): the
    output, at most ``max_length`` bytes (the rest of the stream left unread); whether
    the stream's end was read; whether input followed it. RemoteProtocolError for a
    corrupt stream. In C where the native build runs (one stream kept for every body,
    where zlib's module allocates its state and 32 KB window per body: ``wire/_cdeflate.c``),
    the same output and verdicts as zlib's module (``tests/unit/test_cdeflate.py``)."""
    if _CDEFLATE is not None and len(data) <= C_INFLATE_MAX:
        try:
            out, ended, unused = _CDEFLATE.inflate_dict(data, zdict, max_length)
        except ValueError as e:
            raise RemoteProtocolError(f"bad body: DEFLATE stream is corrupt ({e})") from e
        return cast(bytes, out), bool(ended), unused > 0
    try:
        d = zlib.decompressobj(-15, zdict=zdict) if zdict else zlib.decompressobj(-15)
        out = d.decompress(data, max_length)
    except zlib.error as e:
        raise RemoteProtocolError(f"bad body: DEFLATE stream is corrupt ({e})") from e
    return out, d.eof, bool(d.unused_data)


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
