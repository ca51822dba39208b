"""The Noise UDP transport: an aiocoap MessageInterface over a sans-I/O NoiseEndpoint.

One UDP socket (dual-stack ``::`` with IPV6_V6ONLY=0, or a plain IPv4 bind)
drives one :class:`synapse_coap.noise.endpoint.NoiseEndpoint`. Every Noise
*channel* is one aiocoap remote (:class:`NoiseRemote`): aiocoap's token,
message-id, deduplication and blockwise state is kept per channel, and the
peer's authenticated static key is exposed as ``authenticated_claims``.
Channels survive re-handshakes and address changes (NAT rebinding), so the
CoAP state does too.

Attached to an aiocoap Context by :func:`synapse_coap.transport.manager.attach_transport`
(aiocoap's private ``Context._append_tokenmanaged_messagemanaged_transport`` contract).
Bad datagrams are the endpoint's business: it reports them as ``Dropped`` events,
which are counted and never raised. The endpoint's timers run on ``loop.call_at``
with ``loop.time`` as its clock.

Size: about 620 lines, nearly all of them :class:`NoiseMessageInterface`, whose
sending, receiving, session events and timers drive one endpoint and one
remote table; split, they would pass that state between modules.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiocoap import interfaces
from aiocoap.message import Direction
from aiocoap.util import hostportjoin

from synapse_coap.errors import LinkDown, SynapseCoapError, TrustError
from synapse_coap.noise.badinput import BadInputLog
from synapse_coap.noise.events import (
    ChannelClosed,
    ChannelEstablished,
    Dropped,
    HandshakeFailed,
    Heard,
    Received,
    Transmit,
)
from synapse_coap.noise.lost import SMALL_TYPES
from synapse_coap.noise.retry import RETRY
from synapse_coap.transport.batch import BatchHold, BatchReader
from synapse_coap.transport.datagram import (
    MessageFormatError,
    decode_message,
    reset_for,
)
from synapse_coap.transport.manager import LinkMessageManager, LinkTuning
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics
from synapse_coap.transport.noise_remote import (
    NoiseClaim,
    NoiseLinkError,
    NoiseRemote,
)
from synapse_coap.transport.udp_address import (
    Address,
    _send_host,
    make_udp_socket,
    normalize_address,
)

logger = logging.getLogger(__name__)


def _read_directly(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.DatagramTransport,
    sock: socket.socket,
    reader: BatchReader,
) -> Callable[[], None] | None:
    """Where ``loop``'s driver reads sockets itself (``add_direct_reader``: the guest
    loop of Synapse's default reactor, ``synapse_coap.synapse.guestloop``), have it read
    ``sock`` for ``reader`` instead of the loop's transport, which stops reading: the
    function that stops it; None where the loop reads it (the asyncio reactor, the
    proxy's loop)."""
    add: Callable[[int, Callable[[], None]], Callable[[], None] | None] | None = getattr(
        loop, "add_direct_reader", None
    )
    pause: Callable[[], None] | None = getattr(transport, "pause_reading", None)
    if add is None or pause is None:
        return None
    unread = add(sock.fileno(), functools.partial(reader.readable, sock))
    if unread is not None:
        pause()
    return unread


class SessionEndpoint(Protocol):
    """What this transport needs from ``synapse_coap.noise.endpoint.NoiseEndpoint``."""

    def connect(
        self,
        addr: Address,
        *,
        peer_name: str,
        peer_static: bytes | None,
        early_data: bytes | None = None,
        rto: float | None = None,
        bandwidth_bps: float | None = None,
    ) -> tuple[int, list[Any]]: ...

    def send(self, channel: int, plaintext: bytes) -> list[Any]: ...

    def datagram_received(self, data: bytes, addr: Address) -> list[Any]: ...

    def handle_timers(self) -> list[Any]: ...

    def next_timer(self) -> float | None: ...

    def timers_moved_earlier(self) -> bool: ...

    def suspect_lost(self, channel: int) -> list[Any]: ...

    def set_link_hint(
        self, channel: int, rto: float | None, bandwidth_bps: float | None = None
    ) -> None: ...

    def channel_open(self, channel: int) -> bool: ...

    def close(self, channel: int) -> list[Any]: ...

    def active_channels(self) -> int: ...


#: the sessions gauge is recounted at every change up to this many channels, and
#: beyond at most every SESSIONS_GAUGE_INTERVAL seconds
SESSIONS_GAUGE_EXACT = 256
SESSIONS_GAUGE_INTERVAL = 1.0


#: a datagram's kind by its top two bits
_KINDS = ("reserved", "plain", "handshake", "record")


def _datagram_kind(data: bytes) -> str:
    if data and data[0] in SMALL_TYPES:
        return "hint"  # an unknown-session or path hint, a NAT ping
    return _KINDS[data[0] >> 6] if data else "reserved"


_RETRY = bytes([RETRY])
_STATELESS = (_RETRY, *(bytes([kind]) for kind in SMALL_TYPES))


def _is_stateless(ev: Any) -> bool:
    """A stateless datagram (a retry cookie, a hint, a NAT ping): no timer moved."""
    return isinstance(ev, Transmit) and ev.data[:1] in _STATELESS


def _code_fits_type(code: int, mtype: int) -> bool:
    """RFC 7252: Empty is CON (ping), ACK or RST; requests are CON/NON; responses
    CON/NON/ACK. Anything else (reserved classes, mismatches) is dropped here."""
    if code == 0:
        return mtype != 1  # not NON
    if 1 <= code <= 31:
        return mtype in (0, 1)
    if 64 <= code <= 191:
        return mtype in (0, 1, 2)
    return False


class NoiseMessageInterface(interfaces.MessageInterface):  # type: ignore[misc]
    """aiocoap MessageInterface: CoAP messages in Noise records over one UDP socket."""

    sends_encoded = True  # send(message, data): a datagram the manager encoded already

    def __init__(
        self,
        mman: LinkMessageManager,
        endpoint: SessionEndpoint,
        *,
        loop: asyncio.AbstractEventLoop,
        metrics: TransportMetrics | None = None,
        block_size_exp: int = 6,
        on_established: Callable[[NoiseRemote], None] | None = None,
        on_closed: Callable[[NoiseRemote], None] | None = None,
    ) -> None:
        self._mman: LinkMessageManager | None = mman
        self.endpoint = endpoint
        self.loop = loop
        self.metrics: TransportMetrics = metrics or NullMetrics()
        self.block_size_exp = block_size_exp
        self.on_established = on_established
        self.on_closed = on_closed
        self._transport: asyncio.DatagramTransport | None = None
        #: stops the loop's driver reading the socket directly (None: the loop reads it)
        self._unread: Callable[[], None] | None = None
        #: the socket's protocol: established sessions first under a flood
        self._reader = BatchReader(self._datagram_received, loop, self.metrics.dropped)
        self._family = socket.AF_INET6
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._gauge_at = float("-inf")
        self._gauge_timer: asyncio.TimerHandle | None = None
        self._by_channel: dict[int, NoiseRemote] = {}
        self._client_remotes: dict[tuple[Any, ...], NoiseRemote] = {}
        #: bad datagrams: counted (``dropped``), logged once per source per minute
        self.bad_input = BadInputLog(logger, clock=loop.time, count=self.metrics.dropped)
        mman.on_retransmit = self._on_retransmit
        #: the server's fast path (:mod:`synapse_coap.transport.fastpath`): offered every
        #: decrypted message first; True when it took it (aiocoap never sees it)
        self.fast_request: Callable[[NoiseRemote, bytes], bool] | None = None

    # -- construction ----------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        mman: LinkMessageManager,
        endpoint: SessionEndpoint,
        *,
        bind: Address,
        metrics: TransportMetrics | None = None,
        block_size_exp: int = 6,
        on_established: Callable[[NoiseRemote], None] | None = None,
        on_closed: Callable[[NoiseRemote], None] | None = None,
    ) -> NoiseMessageInterface:
        loop = asyncio.get_running_loop()
        self = cls(
            mman,
            endpoint,
            loop=loop,
            metrics=metrics,
            block_size_exp=block_size_exp,
            on_established=on_established,
            on_closed=on_closed,
        )
        await self._open(bind)
        return self

    async def _open(self, bind: Address) -> None:
        sock = make_udp_socket(bind[0], bind[1])
        self._family = sock.family
        transport, _ = await self.loop.create_datagram_endpoint(lambda: self._reader, sock=sock)
        self._transport = transport
        self._reader.sock = sock  # ours: drained on the loop's thread, as asyncio reads it
        self._unread = _read_directly(self.loop, transport, sock, self._reader)

    async def rebind(self, bind: Address = ("::", 0)) -> Address:
        """Move to a new local socket (a new source port); sessions continue (NAT rebinding)."""
        old, old_unread = self._transport, self._unread
        await self._open(bind)
        if old_unread is not None:
            old_unread()
        if old is not None:
            old.close()
        return self.local_address

    @property
    def read_by_driver(self) -> bool:
        """The socket is read by the loop's driver (Synapse's reactor), not the loop."""
        return self._unread is not None

    @property
    def local_address(self) -> Address:
        if self._transport is None:
            raise RuntimeError("transport not open")
        return normalize_address(self._transport.get_extra_info("sockname"))

    def local_hostinfo(self) -> str:
        host, port = self.local_address
        return str(hostportjoin(host, port))

    # -- remotes -------------------------------------------------------------------------

    def client_remote(
        self, addr: Address, *, peer_name: str, expected_static: bytes | None
    ) -> NoiseRemote:
        """The (stable) remote for a server we talk to; the channel is opened on first send."""
        key = (addr, peer_name, expected_static)
        remote = self._client_remotes.get(key)
        if remote is None:
            remote = NoiseRemote(
                self,
                addr,
                peer_name=peer_name,
                expected_static=expected_static,
                initiator=True,
                block_size_exp=self.block_size_exp,
            )
            self._client_remotes[key] = remote
        return remote

    def remote_for_channel(self, channel: int) -> NoiseRemote | None:
        return self._by_channel.get(channel)

    def close_remote(self, remote: NoiseRemote) -> None:
        """Close the remote's channel (if any); pending exchanges fail with LinkDown."""
        if remote.channel is not None:
            self._process(self.endpoint.close(remote.channel))

    # -- MessageInterface ----------------------------------------------------------------

    def send(self, message: Any, data: bytes | None = None) -> None:
        remote = message.remote
        if self._mman is None or self._transport is None:
            logger.info("not sending %r: transport is shutting down", message)
            return
        if not isinstance(remote, NoiseRemote) or remote.interface is not self:
            logger.warning("message for a foreign remote %r dropped", remote)
            return
        data = message.encode() if data is None else data
        if remote.channel is None:
            early = None
            tuning = message.transport_tuning
            if isinstance(tuning, LinkTuning) and tuning.early_data:
                early = data
            try:
                channel, events = self.endpoint.connect(
                    remote.addr,
                    peer_name=remote.peer_name or remote.hostinfo,
                    peer_static=remote.expected_static,
                    early_data=early,
                    rto=self._mman.estimator(remote).base_rto,
                    bandwidth_bps=self._mman.params.bandwidth_bps,
                )
            except SynapseCoapError as e:
                logger.warning("cannot open a channel to %s: %s", remote.hostinfo, e)
                remote.last_error = e
                self.loop.call_soon(self._fail_remote, remote, e)
                return
            remote.channel = channel
            remote.established = False
            remote._signal_established(False)
            self._by_channel[channel] = remote
            remote.queued_behind_handshake = early is None
            self._process(events)
            if early is not None:
                return
        self._seal(remote.channel, data)

    def send_datagram(self, remote: NoiseRemote, data: bytes) -> None:
        """Send the CoAP datagram ``data`` on the established channel of ``remote`` (the
        server's fast path; a closed channel drops it, as its exchange is gone)."""
        if self._transport is None or remote.channel is None:
            logger.info("not sending to %s: no channel", remote.hostinfo)
            return
        self._seal(remote.channel, data)

    def _seal(self, channel: int, data: bytes) -> None:
        """Send ``data`` as a record of ``channel`` (counted and logged if it cannot be)."""
        try:
            events = self.endpoint.send(channel, data)
        except SynapseCoapError as e:
            logger.warning("cannot send on channel %s: %s", channel, e)
            self.metrics.dropped("send_failed")
            return
        if len(events) == 1:
            # the common case, one record out: what _process does for it, without its
            # pass over event kinds (this runs for every answer the listener sends)
            ev = events[0]
            if type(ev) is Transmit and _datagram_kind(ev.data) == "record":
                try:
                    self._sendto(ev.data, ev.addr)
                except Exception:
                    logger.exception("handling session event Transmit failed")
                self._reschedule()
                return
        self._process(events)

    async def determine_remote(self, message: Any) -> None:
        # Remotes are always set by CoapClient (client_remote); URIs are not routed here.
        return None

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, NoiseRemote) and remote.interface is self

    async def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
            self._gauge_timer = None
        self._mman = None  # the message manager is shutting down: no more callbacks
        for remote in list(self._by_channel.values()):
            if remote.channel is not None:
                try:
                    self._process(self.endpoint.close(remote.channel))
                except Exception:  # pragma: no cover - best effort
                    logger.debug("close on shutdown failed", exc_info=True)
        if self._unread is not None:
            self._unread()
            self._unread = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._reader.close()
        self._by_channel.clear()
        self._client_remotes.clear()

    # -- driving the endpoint ------------------------------------------------------------

    def hold_batches(self, hold: BatchHold) -> None:
        """Let ``hold`` keep the requests of a batch of records until it is read."""
        self._reader.hold = hold

    def _datagram_received(self, data: bytes, addr: Any) -> None:
        self.metrics.datagram("in", _datagram_kind(data), len(data))
        source = normalize_address(addr)
        try:
            events = self.endpoint.datagram_received(data, source)
        except Exception as e:  # a bug, but the datagram is the sender's: no traceback flood
            self.bad_input.report(source[0], "internal_error", e)
            return
        if len(events) == 1 and type(events[0]) is Received:
            # the common case, one message in: what _process does for it, without its
            # pass over event kinds (this runs for every request the listener takes)
            try:
                self._ev_received(events[0])
            except Exception as e:
                self.bad_input.report(source[0], "event_Received", e)
            self._reschedule()
            return
        self._process(events, source[0])

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            events = self.endpoint.handle_timers()
        except Exception:
            logger.exception("session layer timer failed (bug)")
            events = []
        self._process(events)
        # an early wake-up (traffic moved the deadline later) has no events, and
        # _process re-arms only after events: arm for the next deadline in any case
        if self._timer is None:
            self._reschedule()

    def _reschedule(self) -> None:
        if self._transport is None:
            return
        if self._timer is not None and not self.endpoint.timers_moved_earlier():
            return  # the armed wake-up is soon enough (if early, it re-arms then)
        at = self.endpoint.next_timer()
        if at is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                self._timer_at = None
            return
        if self._timer is not None and self._timer_at == at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_retransmit(self, remote: Any, sent_at: float, counter: int) -> None:
        """A confirmable message is retransmitted: maybe the peer lost our session.

        Only when nothing at all was heard on the channel since the message was
        sent, for at least twice the message's first wait: on the first
        retransmission after a quiet period (a restarted peer is found within one
        retransmission), else on the second (at heavy loss a first retransmission
        is routine, and the old session usually still works). The session layer
        rate-limits further (one re-handshake at a time, backoff)."""
        if not isinstance(remote, NoiseRemote) or remote.interface is not self:
            return
        if remote.channel is None or not remote.established or self._mman is None:
            return
        if remote.last_received >= sent_at:
            return
        now = self.loop.time()
        silence = now - remote.last_received
        if counter < 2 and silence < 2 * (now - sent_at):
            return
        logger.info(
            "nothing heard from %s for %.1f s: checking the session", remote.hostinfo, silence
        )
        self.endpoint.set_link_hint(
            remote.channel,
            self._mman.estimator(remote).base_rto,
            self._mman.params.bandwidth_bps,
        )
        self._process(self.endpoint.suspect_lost(remote.channel))

    def _sendto(self, data: bytes, addr: Address) -> None:
        if self._transport is None:
            return
        host, port = addr
        target = _send_host(self._family, host)
        if target is None:
            logger.warning("cannot send to IPv6 %s from an IPv4 socket", host)
            self.metrics.dropped("address_family")
            return
        self.metrics.datagram("out", _datagram_kind(data), len(data))
        self._transport.sendto(data, (target, port))

    def _process(self, events: Sequence[Any], source: str | None = None) -> None:
        sessions_changed = False
        for ev in events:
            try:
                if isinstance(ev, Transmit):
                    # a responder's keys exist once IK2 is written (maybe after the
                    # ChannelEstablished event): recount sessions after handshake datagrams
                    sessions_changed = sessions_changed or (
                        _datagram_kind(ev.data) == "handshake" and not _is_stateless(ev)
                    )
                    self._ev_transmit(ev)
                elif isinstance(ev, Received):
                    self._ev_received(ev)
                elif isinstance(ev, Heard):
                    self._ev_heard(ev)
                elif isinstance(ev, ChannelEstablished):
                    self._ev_established(ev)
                elif isinstance(ev, ChannelClosed):
                    self._ev_closed(ev)
                elif isinstance(ev, HandshakeFailed):
                    self._ev_handshake_failed(ev)
                elif isinstance(ev, Dropped):
                    self._ev_dropped(ev)
                else:
                    logger.debug("unhandled session event %r", type(ev).__name__)
            except Exception as e:
                if source is None:
                    logger.exception("handling session event %s failed", type(ev).__name__)
                else:  # caused by a datagram: the sender's, counted, no traceback flood
                    self.bad_input.report(source, f"event_{type(ev).__name__}", e)
        if sessions_changed:
            self._sessions_changed()
        if not all(isinstance(ev, Dropped) or _is_stateless(ev) for ev in events):
            # (a dropped datagram or a stateless retry changes no timer: under a flood
            # this skips a walk over every session per datagram)
            self._reschedule()

    def _sessions_changed(self) -> None:
        """Update the sessions gauge: at once with few channels or if it was last
        updated over a second ago, else once a second is up (counting is a pass over
        every session: a listener taking thousands of handshakes must not do it per
        handshake)."""
        now = self.loop.time()
        if (
            len(self._by_channel) <= SESSIONS_GAUGE_EXACT
            or now - self._gauge_at >= SESSIONS_GAUGE_INTERVAL
        ):
            self._update_gauge()
        elif self._gauge_timer is None:
            self._gauge_timer = self.loop.call_at(
                self._gauge_at + SESSIONS_GAUGE_INTERVAL, self._update_gauge
            )

    def _update_gauge(self) -> None:
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
            self._gauge_timer = None
        self._gauge_at = self.loop.time()
        self.metrics.sessions(self.endpoint.active_channels())

    def _ev_transmit(self, ev: Transmit) -> None:
        if ev.data[:1] == _RETRY:  # a stateless retry cookie (half-open state under pressure)
            self.metrics.handshake("retry")
        self._sendto(ev.data, ev.addr)

    def _ev_established(self, ev: ChannelEstablished) -> None:
        remote = self._by_channel.get(ev.channel)
        if remote is None:
            remote = NoiseRemote(
                self,
                ev.addr,
                peer_name=ev.peer_name,
                expected_static=None,
                initiator=bool(ev.initiator),
                channel=ev.channel,
                block_size_exp=self.block_size_exp,
            )
            self._by_channel[ev.channel] = remote
        remote.addr = ev.addr
        remote.established = True
        remote.establishments += 1
        remote.peer_static = ev.peer_static
        if ev.peer_name is not None:
            remote.peer_name = ev.peer_name
        remote.profile_id = ev.profile_id
        remote.peer_app_payload = ev.peer_app_payload
        remote.last_received = self.loop.time()
        remote.last_error = None
        if remote.queued_behind_handshake and self._mman is not None:
            remote.queued_behind_handshake = False
            self._mman.estimator(remote).restamp()
        remote._signal_established(True)
        self.metrics.handshake("ok")
        self._sessions_changed()
        if self.on_established is not None:
            self.on_established(remote)

    def _ev_received(self, ev: Received) -> None:
        remote = self._by_channel.get(ev.channel)
        if remote is None:
            self.metrics.dropped("unknown_channel")
            return
        remote.addr = ev.addr
        remote.address_validated = bool(getattr(ev, "validated", True))
        remote.last_received = self.loop.time()
        remote.heard()
        if self._mman is None:
            return
        fast = self.fast_request
        if fast is not None and fast(remote, ev.plaintext):
            return
        try:
            message = decode_message(ev.plaintext, remote)
        except MessageFormatError as e:  # incl. bad UTF-8 in a string option
            self.bad_input.report(remote.addr[0], "bad_coap", e)
            reset = reset_for(ev.plaintext)
            if reset is not None and remote.channel is not None:
                # RFC 7252 4.2: a malformed Confirmable message is rejected with a Reset
                try:
                    self._process(self.endpoint.send(remote.channel, reset))
                except SynapseCoapError as send_error:
                    logger.debug("Reset to %s not sent: %s", remote.hostinfo, send_error)
            return
        if not _code_fits_type(int(message.code), int(message.mtype)):
            # aiocoap would log a WARNING for each such message
            self.bad_input.report(remote.addr[0], "bad_coap_code")
            return
        message.direction = Direction.INCOMING
        self._mman.dispatch_message(message)

    def _ev_heard(self, ev: Heard) -> None:
        remote = self._by_channel.get(ev.channel)
        if remote is not None:
            remote.last_received = self.loop.time()
            remote.heard()

    def _fail_remote(self, remote: NoiseRemote, error: SynapseCoapError) -> None:
        if self._mman is not None:
            self._mman.dispatch_error(NoiseLinkError(error), remote)

    def _ev_closed(self, ev: ChannelClosed) -> None:
        remote = self._by_channel.pop(ev.channel, None)
        self._sessions_changed()
        if remote is None:
            return
        remote.channel = None
        remote.established = False
        remote._signal_established(False)
        err = remote.last_error or LinkDown(f"session with {remote.hostinfo} closed: {ev.reason}")
        if self.on_closed is not None:
            self.on_closed(remote)
        self._fail_remote(remote, err)
        if self._mman is not None:
            self._mman.forget_remote(remote)

    def _ev_handshake_failed(self, ev: HandshakeFailed) -> None:
        error: SynapseCoapError = ev.error
        self.metrics.handshake("refused" if isinstance(error, TrustError) else "failed")
        logger.warning("handshake with %s failed: %s", ev.addr, ev.reason)
        if ev.channel is None:
            return
        if self.endpoint.channel_open(ev.channel):
            # A re-handshake failed but the old session still works: not a link failure.
            logger.info("channel %s keeps its current session", ev.channel)
            return
        remote = self._by_channel.pop(ev.channel, None)
        if remote is None:
            return
        remote.channel = None
        remote.established = False
        remote.last_error = error
        self._fail_remote(remote, error)

    def _ev_dropped(self, ev: Dropped) -> None:
        self.metrics.dropped(str(ev.reason))
        logger.debug("dropped %d bytes from %s: %s", ev.size, ev.addr, ev.reason)


__all__ = [
    "Address",
    "NoiseClaim",
    "NoiseLinkError",
    "NoiseMessageInterface",
    "NoiseRemote",
    "SessionEndpoint",
    "make_udp_socket",
    "normalize_address",
]
