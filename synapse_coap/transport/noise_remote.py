"""The peers of the Noise transport as aiocoap sees them: :class:`NoiseRemote` (one per
channel: its address, handshake state and link hints), the authenticated identity of a
channel (:class:`NoiseClaim`) and the error a failed channel reports (:class:`NoiseLinkError`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import attrs
from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.util import hostportjoin

from synapse_coap.errors import SynapseCoapError
from synapse_coap.transport.udp_address import (
    Address,
)

if TYPE_CHECKING:
    from synapse_coap.transport.noise_udp import NoiseMessageInterface


class NoiseLinkError(coap_error.NetworkError):  # type: ignore[misc]
    """Reported to aiocoap for a channel that failed; ``cause`` is our exception."""

    def __init__(self, cause: SynapseCoapError) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.__cause__ = cause


@attrs.frozen
class NoiseClaim:
    """The authenticated identity of a Noise channel (``authenticated_claims`` item)."""

    static_key: bytes
    peer_name: str | None


class NoiseRemote(interfaces.EndpointAddress):  # type: ignore[misc]
    """One Noise channel, as an aiocoap remote. Hashes by identity (one object per channel)."""

    scheme = "coap+noise"
    is_multicast = False
    is_multicast_locally = False
    #: settable per instance (as in aiocoap's udp6 remotes)
    maximum_block_size_exp = 6

    def __init__(
        self,
        interface: NoiseMessageInterface,
        addr: Address,
        *,
        peer_name: str | None,
        expected_static: bytes | None,
        initiator: bool,
        channel: int | None = None,
        block_size_exp: int = 6,
    ) -> None:
        self.interface = interface
        self.addr = addr
        self.peer_name = peer_name
        self.expected_static = expected_static
        self.initiator = initiator
        self.channel = channel
        self.maximum_block_size_exp = block_size_exp
        self.established = False
        #: False while the latest message came from an address not yet validated
        #: (0-RTT from a new address, a move): the address may be spoofed
        self.address_validated = True
        #: how many handshakes completed on this remote (re-handshakes included)
        self.establishments = 0
        self.peer_static: bytes | None = None
        self.profile_id = 0
        self.peer_app_payload = b""
        self.last_received = float("-inf")
        self.last_error: SynapseCoapError | None = None
        #: the first messages wait for the handshake (no 0-RTT): their RTT
        #: samples must not include it
        self.queued_behind_handshake = False
        self._established_event: asyncio.Event | None = None
        self._heard_event: asyncio.Event | None = None
        #: free slot for the layer above (server: per-session codec and tokens)
        self.app_state: Any = None

    @property
    def established_event(self) -> asyncio.Event:
        """Set while the channel is established. Made on first use: a listener holds
        thousands of remotes, and an Event with its waiter deque is about 1 KB."""
        if self._established_event is None:
            self._established_event = asyncio.Event()
            if self.established:
                self._established_event.set()
        return self._established_event

    def _signal_established(self, established: bool) -> None:
        event = self._established_event
        if event is not None:
            if established:
                event.set()
            else:
                event.clear()

    def heard(self) -> None:
        """Something authentic arrived from the peer (a message or a keep-alive)."""
        event = self._heard_event
        if event is not None:
            self._heard_event = None
            event.set()

    def next_heard(self) -> asyncio.Event:
        """An event set the next time the peer is heard from (server push uses it to
        resend a parked notification as soon as the peer is back). Made on first use."""
        if self._heard_event is None:
            self._heard_event = asyncio.Event()
        return self._heard_event

    def __repr__(self) -> str:
        return f"<NoiseRemote channel={self.channel} {self.hostinfo} peer={self.peer_name!r}>"

    @property
    def hostinfo(self) -> str:
        return str(hostportjoin(self.addr[0], self.addr[1]))

    @property
    def hostinfo_local(self) -> str:
        return self.interface.local_hostinfo()

    @property
    def uri_base(self) -> str:
        return "coap+noise://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coap+noise://" + self.hostinfo_local

    @property
    def blockwise_key(self) -> object:
        return ("noise", id(self.interface), id(self))

    @property
    def maximum_payload_size(self) -> int:
        return 1024

    @property
    def authenticated_claims(self) -> tuple[NoiseClaim, ...]:
        if not self.established or self.peer_static is None:
            return ()
        return (NoiseClaim(self.peer_static, self.peer_name),)
