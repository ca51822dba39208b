"""The closed set of immutable events a :class:`NoiseEndpoint` returns."""

from __future__ import annotations

import attrs

from synapse_coap.errors import SynapseCoapError

Address = tuple[str, int]


@attrs.frozen
class Transmit:
    """Send ``data`` as one UDP datagram to ``addr``."""

    addr: Address
    data: bytes


@attrs.frozen
class ChannelEstablished:
    """A handshake completed on ``channel``.

    May be emitted again for the same channel after a re-handshake (lost peer
    state, restarted client); the latest values win.
    """

    channel: int
    addr: Address
    peer_static: bytes
    peer_name: str | None
    profile_id: int
    peer_app_payload: bytes
    initiator: bool


@attrs.frozen
class Received:
    """An authentic, never-before-seen plaintext (a CoAP message) on ``channel``.

    ``validated``: ``addr`` has proved it receives our datagrams (False for 0-RTT
    data from an address not yet validated, and after a move until the path
    challenge is answered): the layer above must not use the address as the
    sender's identity while False (it may be spoofed)."""

    channel: int
    addr: Address
    plaintext: bytes
    validated: bool = True


@attrs.frozen
class Heard:
    """An authentic control record (a keep-alive, a path check) arrived on ``channel``'s
    current session: the peer is there, although it sent no message for the layer above."""

    channel: int


@attrs.frozen
class ChannelClosed:
    channel: int
    reason: str


@attrs.frozen
class HandshakeFailed:
    channel: int | None
    addr: Address
    reason: str
    error: SynapseCoapError


@attrs.frozen
class Dropped:
    """A datagram was dropped (and counted in ``stats`` as ``dropped.<reason>``)."""

    addr: Address
    reason: str
    size: int


Event = Transmit | ChannelEstablished | Received | Heard | ChannelClosed | HandshakeFailed | Dropped


@attrs.frozen
class ChannelInfo:
    addr: Address
    peer_static: bytes | None
    peer_name: str | None
    profile_id: int
    established: bool
    initiator: bool
