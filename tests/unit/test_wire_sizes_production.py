"""The README's wire sizes are what production puts on the wire (issue 16).

``bench/wire_sizes.py`` sizes each CoAP message with the mapping layer's
sans-I/O serializer (:func:`synapse_coap.mapping.samples.datagram_size`), while the
listeners and clients send aiocoap's encoding of :func:`to_aiocoap`'s message. For
every request and response of the held-out corpus, as the bench builds them, both
give the same bytes, so the figures are the production path's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from aiocoap.numbers.types import Type

from synapse_coap.mapping import samples
from synapse_coap.mapping.coap import encode_coap
from synapse_coap.mapping.messages import CoapMessage
from synapse_coap.transport.convert import to_aiocoap

ROOT = Path(__file__).resolve().parent.parent.parent


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location(
        "wire_sizes_bench", ROOT / "bench" / "wire_sizes.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _aiocoap_bytes(msg: CoapMessage, token: bytes) -> bytes:
    out = to_aiocoap(msg)
    out.mtype = Type.CON
    out.mid = 0
    out.token = token
    return bytes(out.encode())


@pytest.mark.parametrize("profile_id", [1, 2])
def test_corpus_messages_encode_the_same_under_aiocoap(
    profile_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[CoapMessage] = []
    real = samples.datagram_size

    def recording(msg: CoapMessage) -> int:
        seen.append(msg)
        return real(msg)

    bench = _bench()
    monkeypatch.setattr(bench.samples, "datagram_size", recording)
    rows = bench.rows(profile_id, "heldout")
    assert len(seen) == len(rows) > 20
    token = b"\x5a" * samples.AIOCOAP_TOKEN_LENGTH
    for msg, row in zip(seen, rows, strict=True):
        ours = encode_coap(msg, token=token)
        assert len(ours) == row["coap"]
        assert _aiocoap_bytes(msg, token) == ours, row.get("name", row)
