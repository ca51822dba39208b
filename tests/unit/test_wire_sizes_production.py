"""The README's wire sizes are what production puts on the wire (issue 16).

``bench/wire_sizes.py`` sizes each CoAP message with the mapping layer's
sans-I/O serializer (:func:`synapse_coap.mapping.samples.datagram_size`), while the
listeners and clients send aiocoap's encoding of :func:`to_aiocoap`'s message. For
every request and response of the held-out corpus, as the bench builds them, both
give the same bytes, so the figures are the production path's.
"""

from __future__ import annotations

import pytest
from aiocoap.numbers.types import Type

from synapse_coap.mapping import samples
from synapse_coap.mapping.coap import encode_coap
from synapse_coap.mapping.messages import CoapMessage
from synapse_coap.transport.convert import to_aiocoap
from tests.harness.bench import load_bench


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

    bench = load_bench("wire_sizes")
    monkeypatch.setattr(bench.samples, "datagram_size", recording)
    rows = bench.rows(profile_id, "heldout")
    assert len(seen) == len(rows) > 20
    token = b"\x5a" * samples.AIOCOAP_TOKEN_LENGTH
    for msg, row in zip(seen, rows, strict=True):
        ours = encode_coap(msg, token=token)
        assert len(ours) == row["coap"]
        assert _aiocoap_bytes(msg, token) == ours, row.get("name", row)
