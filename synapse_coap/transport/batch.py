"""The order in which a batch of received datagrams is processed (issue 14).

When datagrams arrive faster than the listener handles them (a flood of
handshake messages, each validated one costing Diffie-Hellman work), the
kernel's socket buffer fills and drops whatever arrives next, an established
client's request as readily as the flood. So the listener reads what is
waiting in one go (up to :data:`DRAIN_MAX` datagrams per wake-up, a few
microseconds each) and, in that batch:

* records of established sessions (and plain CoAP) go first, except from a
  source that also sent a handshake message in the batch, whose datagrams keep
  their order behind it;
* handshake messages then go round robin over source prefixes (IPv4 /24, IPv6
  /48), so one prefix's flood does not crowd out a new client elsewhere;
* at most :data:`BATCH_HANDSHAKES` handshake messages per batch are handled;
  the rest are dropped (counted as ``handshake_overload``), and their senders
  retransmit as after any loss.

A quiet listener reads one datagram per wake-up and nothing changes. Sans-I/O:
:func:`order_batch` only orders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from synapse_coap.noise.retry import prefix_key

#: datagrams read per wake-up at most (the one asyncio read, then the socket drained)
DRAIN_MAX = 64
#: handshake messages handled per batch at most (about 0.3 ms each when validated)
BATCH_HANDSHAKES = 16


def is_handshake(data: bytes) -> bool:
    """A Noise handshake message (the first two bits of the first byte are 10)."""
    return bool(data) and data[0] >> 6 == 0b10


def order_batch(
    batch: Sequence[tuple[bytes, Any]],
    host_of: Callable[[Any], str],
    *,
    handshakes: int = BATCH_HANDSHAKES,
) -> tuple[list[tuple[bytes, Any]], int]:
    """(the datagrams to handle, in order; how many handshake messages were dropped)."""
    if len(batch) == 1:
        return list(batch), 0
    first: list[tuple[bytes, Any]] = []
    held: dict[str, list[tuple[bytes, Any]]] = {}  # by prefix, in arrival order
    held_sources: set[Any] = set()
    for item in batch:
        data, source = item
        if is_handshake(data) or source in held_sources:
            held_sources.add(source)
            held.setdefault(prefix_key(host_of(source)), []).append(item)
        else:
            first.append(item)
    queues = list(held.values())
    later: list[tuple[bytes, Any]] = []
    taken = dropped = 0
    while queues:
        rest = []
        for q in queues:
            data, source = q.pop(0)
            if is_handshake(data):
                if taken >= handshakes:
                    dropped += 1
                else:
                    taken += 1
                    later.append((data, source))
            else:
                later.append((data, source))
            if q:
                rest.append(q)
        queues = rest
    return first + later, dropped
