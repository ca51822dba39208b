"""The body encoder's DEFLATE runs with a memLevel sized to the body
(``synapse_coap.wire.body_encode.deflate_mem_level``): the same bytes as zlib's
memLevel 9 on every body of the corpora, with the profile dictionary, without one,
and against a push base, so no wire size moves."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest

from synapse_coap.wire.body_encode import (
    MAX_MEM_LEVEL,
    MIN_MEM_LEVEL,
    _deflate,
    _encode_cbor,
    deflate_mem_level,
)
from synapse_coap.wire.body_tables import base_dictionary
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile, profile_ids

ROOT = Path(__file__).resolve().parents[2]
CONTEXTS = (WireContext(), WireContext(server_names=("example.org", "matrix.org")))


def _bodies() -> list[Any]:
    found: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            body = x.get("body")
            if isinstance(body, (dict, list)):
                found.append(body)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted((ROOT / "tests" / "corpus").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                walk(json.loads(line))
    return found


def _reference(data: bytes, zdict: bytes) -> bytes:
    """zlib at memLevel 9 (what the encoder ran before)."""
    if zdict:
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return c.compress(data) + c.flush()


def test_the_mem_level_leaves_room_for_every_byte_in_one_block() -> None:
    for size in [0, 1, 100, 2046, 2047, 4094, 4095, 16382, 16383, 32766, 32767, 10**6]:
        level = deflate_mem_level(size)
        assert MIN_MEM_LEVEL <= level <= MAX_MEM_LEVEL
        # zlib ends a block when 2**(memLevel+6) - 1 symbols are buffered
        assert level == MAX_MEM_LEVEL or (1 << (level + 6)) - 1 > size, size
        if level > MIN_MEM_LEVEL:
            assert (1 << (level + 5)) - 1 <= size + 1, size  # the smallest that does


@pytest.mark.parametrize("profile_id", [p for p in profile_ids() if p > 0])
def test_same_bytes_as_mem_level_9_on_the_corpora(profile_id: int) -> None:
    profile = load_profile(profile_id)
    bodies = _bodies()
    assert len(bodies) > 500
    checked = 0
    previous = b""
    for context in CONTEXTS:
        for body in bodies:
            raw = _encode_cbor(body, profile, context)
            for zdict in (profile.dictionary, b""):
                assert _deflate(raw, zdict) == _reference(raw, zdict), body
                checked += 1
            if previous:  # a push notification against the one before
                zdict = base_dictionary(profile, previous)
                assert _deflate(raw, zdict) == _reference(raw, zdict), body
                checked += 1
            previous = raw
    assert checked > 3 * len(bodies)
