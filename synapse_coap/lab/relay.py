"""A UDP impairment relay that needs no root.

Clients send to the relay's address; it forwards each datagram to one fixed
upstream and relays the replies back. Every client gets its own upstream
socket (so several clients work, and the server sees one port per client).
What happens to each datagram (rate, queue, latency, jitter, loss,
duplication, reordering) is decided by the sans-I/O
:class:`~synapse_coap.lab.model.LinkModel`; this module only moves bytes at
the times the model says.

NAT rebinding: at the times of the profile's
:class:`~synapse_coap.lab.model.RebindSchedule`, every client's upstream
socket is closed and replaced by a new one, so the server sees a new source
port; replies still addressed to the old port are lost, as behind a real NAT.

From Python::

    relay = await Relay.start(RelayConfig(listen=("127.0.0.1", 0),
                                          upstream=("127.0.0.1", 5683),
                                          profile=get_profile("100bps"), seed=1))
    ... send to relay.address ...
    print(relay.stats)
    await relay.close()

From the shell: ``synapse-coap relay --listen 127.0.0.1:6000 --upstream
127.0.0.1:5683 --profile 100bps --seed 1`` (or ``python -m
synapse_coap.lab ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import signal
import socket
from typing import Any

import attrs

from synapse_coap.errors import ConfigValueError
from synapse_coap.lab.model import (
    PROFILES,
    DirectionStats,
    LinkModel,
    LinkProfile,
    header_overhead,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Relay",
    "RelayConfig",
    "RelayStats",
]

Address = tuple[str, int]

#: Largest UDP payload we read.
_RECV_SIZE = 65536
#: Datagrams read per readiness callback before yielding to the loop.
_READ_BATCH = 64
#: Tolerance when deciding which scheduled datagrams are due.
_TIMER_SLACK = 1e-6


@attrs.frozen
class RelayConfig:
    """How to run a :class:`Relay`.

    - ``listen``: where clients send (port 0 picks a free port; see
      :attr:`Relay.address`).
    - ``upstream``: the server every datagram is forwarded to.
    - ``profile``: the link; ``seed``: makes every impairment decision
      reproducible.
    - ``header_overhead``: IP + UDP header bytes counted per datagram; by
      default from the address family of the socket the datagram leaves the
      relay on (28 for IPv4, 48 for IPv6): the upstream's for the uplink, the
      listening socket's for the downlink.
    - ``max_clients``: further clients are ignored (counted); idle clients
      are forgotten after ``client_idle_timeout`` seconds.
    - ``trace``: keep a :class:`~synapse_coap.lab.model.TraceRecord` per
      datagram in ``relay.model.uplink.trace`` / ``downlink.trace``.
    """

    listen: Address
    upstream: Address
    profile: LinkProfile = PROFILES["lan"]
    seed: int = 0
    header_overhead: int | None = None
    max_clients: int = 256
    client_idle_timeout: float = 600.0
    trace: bool = False

    def __attrs_post_init__(self) -> None:
        for name in ("listen", "upstream"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or len(value) != 2
                or not isinstance(value[0], str)
                or not isinstance(value[1], int)
                or not 0 <= value[1] <= 65535
            ):
                raise ConfigValueError(name, f"must be a (host, port) pair, got {value!r}")
        if self.upstream[1] == 0:
            raise ConfigValueError("upstream", "port must not be 0")
        if self.header_overhead is not None and (
            not isinstance(self.header_overhead, int) or self.header_overhead < 0
        ):
            raise ConfigValueError("header_overhead", "must be an integer >= 0")
        if self.max_clients < 1:
            raise ConfigValueError("max_clients", "must be >= 1")
        if self.client_idle_timeout <= 0:
            raise ConfigValueError("client_idle_timeout", "must be > 0 seconds")


@attrs.frozen
class RelayStats:
    """The model's exact counters plus what the relay actually did with sockets.

    ``sent_upstream`` / ``sent_downstream`` count datagrams handed to the
    kernel; ``pending`` those scheduled but not yet due (when the stats were
    taken); ``send_errors`` sends the kernel refused (and datagrams whose
    client was forgotten before they were due).
    """

    uplink: DirectionStats
    downlink: DirectionStats
    sent_upstream: int
    sent_downstream: int
    pending: int
    send_errors: int
    clients: int
    clients_refused: int
    rebinds: int

    def as_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for prefix, stats in (("up", self.uplink), ("down", self.downlink)):
            for key, value in stats.as_dict().items():
                out[f"{prefix}_{key}"] = value
        for key in (
            "sent_upstream",
            "sent_downstream",
            "pending",
            "send_errors",
            "clients",
            "clients_refused",
            "rebinds",
        ):
            out[key] = getattr(self, key)
        return out

    def __str__(self) -> str:
        return (
            f"up: {self.uplink} | down: {self.downlink} | clients {self.clients} "
            f"(refused {self.clients_refused}), rebinds {self.rebinds}, "
            f"pending {self.pending}, send errors {self.send_errors}"
        )


class _Client:
    """One client of the relay: its address and its current upstream socket."""

    __slots__ = ("addr", "epoch", "last_active", "sock")

    def __init__(self, addr: Any, sock: socket.socket, epoch: int, now: float) -> None:
        self.addr = addr
        self.sock = sock
        self.epoch = epoch
        self.last_active = now


class Relay:
    """The running relay. Create with :meth:`start`, stop with :meth:`close`."""

    @classmethod
    async def start(cls, config: RelayConfig) -> Relay:
        loop = asyncio.get_running_loop()
        listen_info = await _resolve(loop, config.listen, "listen")
        upstream_info = await _resolve(loop, config.upstream, "upstream")
        return cls(config, loop, listen_info, upstream_info)

    def __init__(
        self,
        config: RelayConfig,
        loop: asyncio.AbstractEventLoop,
        listen_info: tuple[int, Any],
        upstream_info: tuple[int, Any],
    ) -> None:
        """Internal: use ``await Relay.start(config)``."""
        self.config = config
        self._loop = loop
        listen_family, listen_addr = listen_info
        self._upstream_family, self._upstream_addr = upstream_info
        sock = socket.socket(listen_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(listen_addr)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        up_overhead = config.header_overhead
        down_overhead = config.header_overhead
        if up_overhead is None:
            up_overhead = header_overhead(self._upstream_family)
        if down_overhead is None:
            down_overhead = header_overhead(listen_family)
        self.model = LinkModel(
            config.profile,
            seed=config.seed,
            start=loop.time(),
            uplink_overhead=up_overhead,
            downlink_overhead=down_overhead,
            trace=config.trace,
        )
        self._clients: dict[Any, _Client] = {}
        self._queue: list[tuple[float, int, bool, _Client, bytes]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._rebind_timer: asyncio.TimerHandle | None = None
        self._cleanup_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._sent_upstream = 0
        self._sent_downstream = 0
        self._send_errors = 0
        self._clients_refused = 0
        self._rebinds = 0
        loop.add_reader(sock.fileno(), self._on_listen_readable)
        self._schedule_rebind()
        self._cleanup_timer = loop.call_later(
            min(config.client_idle_timeout / 2, 60.0), self._cleanup
        )
        logger.info(
            "relay listening on %s -> %s, profile %s, seed %d",
            _fmt_addr(self.address),
            _fmt_addr(self._upstream_addr),
            config.profile.name,
            config.seed,
        )

    # -- public -------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The bound listening address (host, port)."""
        host, port = self._sock.getsockname()[:2]
        return (host, port)

    @property
    def upstream(self) -> Address:
        host, port = self._upstream_addr[:2]
        return (host, port)

    def upstream_port(self, client: Address) -> int | None:
        """The relay's current source port toward the upstream for ``client``."""
        for key, c in self._clients.items():
            if key[:2] == client[:2]:
                port: int = c.sock.getsockname()[1]
                return port
        return None

    def set_profile(self, profile: LinkProfile) -> None:
        """Change the link from now on (counters and random streams continue)."""
        self.model.set_profile(profile)
        self._schedule_rebind()

    @property
    def stats(self) -> RelayStats:
        link = self.model.stats
        return RelayStats(
            uplink=link.uplink,
            downlink=link.downlink,
            sent_upstream=self._sent_upstream,
            sent_downstream=self._sent_downstream,
            pending=len(self._queue),
            send_errors=self._send_errors,
            clients=len(self._clients),
            clients_refused=self._clients_refused,
            rebinds=self._rebinds,
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every scheduled datagram has been sent (or ``timeout``)."""
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        while self._queue and not self._closed:
            wait = max(0.0, self._queue[0][0] - loop.time()) + 0.001
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                wait = min(wait, remaining)
            await asyncio.sleep(wait)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._timer, self._rebind_timer, self._cleanup_timer):
            if timer is not None:
                timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for client in self._clients.values():
            self._close_client_socket(client)
        self._clients.clear()
        logger.info("relay closed: %s", self.stats)

    async def __aenter__(self) -> Relay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- receiving ------------------------------------------------------------

    def _on_listen_readable(self) -> None:
        now = self._loop.time()
        for _ in range(_READ_BATCH):
            try:
                data, addr = self._sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.debug("relay: listen socket error: %s", exc)
                return
            client = self._clients.get(addr)
            if client is None:
                client = self._new_client(addr, now)
                if client is None:
                    continue
            client.last_active = now
            for d in self.model.uplink.offer(now, data):
                self._push(d.deliver_at, True, client, d.datagram)

    def _on_upstream_readable(self, client: _Client, sock: socket.socket) -> None:
        if sock is not client.sock:  # a socket replaced by a rebind
            return
        now = self._loop.time()
        for _ in range(_READ_BATCH):
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable from the upstream
                logger.debug("relay: upstream socket error for %s: %s", client.addr, exc)
                continue
            client.last_active = now
            for d in self.model.downlink.offer(now, data):
                self._push(d.deliver_at, False, client, d.datagram)

    def _new_client(self, addr: Any, now: float) -> _Client | None:
        if len(self._clients) >= self.config.max_clients:
            self._clients_refused += 1
            logger.warning("relay: too many clients, ignoring %s", _fmt_addr(addr))
            return None
        epoch = self.model.epoch_at(now)
        try:
            sock = self._open_upstream_socket()
        except OSError as exc:
            logger.warning("relay: cannot open an upstream socket: %s", exc)
            self._clients_refused += 1
            return None
        client = _Client(addr, sock, epoch, now)
        self._watch(client)
        self._clients[addr] = client
        logger.debug("relay: new client %s via port %d", _fmt_addr(addr), sock.getsockname()[1])
        return client

    def _open_upstream_socket(self) -> socket.socket:
        sock = socket.socket(self._upstream_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self._upstream_addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _watch(self, client: _Client) -> None:
        sock = client.sock
        self._loop.add_reader(sock.fileno(), self._on_upstream_readable, client, sock)

    def _close_client_socket(self, client: _Client) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(client.sock.fileno())
        client.sock.close()

    # -- NAT rebinding --------------------------------------------------------

    def _rebind(self, client: _Client, epoch: int) -> None:
        try:
            new = self._open_upstream_socket()
        except OSError as exc:
            logger.warning("relay: rebind failed for %s: %s", _fmt_addr(client.addr), exc)
            return
        old_port = client.sock.getsockname()[1]
        self._close_client_socket(client)
        client.sock = new
        client.epoch = epoch
        self._watch(client)
        self._rebinds += 1
        logger.info(
            "relay: rebound %s: upstream source port %d -> %d",
            _fmt_addr(client.addr),
            old_port,
            new.getsockname()[1],
        )

    def _ensure_epoch(self, client: _Client, at: float) -> None:
        epoch = self.model.epoch_at(at)
        if epoch != client.epoch:
            self._rebind(client, epoch)

    def _schedule_rebind(self) -> None:
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None
        nxt = self.model.next_rebind_at(self._loop.time())
        if nxt is not None:
            self._rebind_timer = self._loop.call_at(nxt, self._on_rebind_timer)

    def _on_rebind_timer(self) -> None:
        self._rebind_timer = None
        if self._closed:
            return
        now = self._loop.time()
        for client in list(self._clients.values()):
            self._ensure_epoch(client, now)
        self._schedule_rebind()

    # -- sending at the model's times -----------------------------------------

    def _push(self, at: float, uplink: bool, client: _Client, data: bytes) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), uplink, client, data))
        self._arm()

    def _arm(self) -> None:
        if not self._queue or self._closed:
            return
        head = self._queue[0][0]
        if self._timer is not None and self._timer_at is not None and self._timer_at <= head:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = head
        self._timer = self._loop.call_at(head, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        # asyncio may run a timer up to its clock resolution early
        now = self._loop.time() + _TIMER_SLACK
        while self._queue and self._queue[0][0] <= now:
            at, _, uplink, client, data = heapq.heappop(self._queue)
            if uplink:
                self._send_upstream(client, data, at)
            else:
                self._send_downstream(client, data)
        self._arm()

    def _send_upstream(self, client: _Client, data: bytes, at: float) -> None:
        if self._clients.get(client.addr) is not client:
            self._send_errors += 1
            return
        self._ensure_epoch(client, at)
        try:
            client.sock.send(data)
        except OSError as exc:
            self._send_errors += 1
            logger.debug("relay: send upstream failed: %s", exc)
            return
        self._sent_upstream += 1

    def _send_downstream(self, client: _Client, data: bytes) -> None:
        try:
            self._sock.sendto(data, client.addr)
        except OSError as exc:
            self._send_errors += 1
            logger.debug("relay: send downstream failed: %s", exc)
            return
        self._sent_downstream += 1

    def _cleanup(self) -> None:
        self._cleanup_timer = None
        if self._closed:
            return
        now = self._loop.time()
        horizon = now - self.config.client_idle_timeout
        for addr, client in list(self._clients.items()):
            if client.last_active < horizon:
                del self._clients[addr]
                self._close_client_socket(client)
                logger.debug("relay: forgot idle client %s", _fmt_addr(addr))
        self._cleanup_timer = self._loop.call_later(
            min(self.config.client_idle_timeout / 2, 60.0), self._cleanup
        )


async def _resolve(loop: asyncio.AbstractEventLoop, addr: Address, path: str) -> tuple[int, Any]:
    host, port = addr
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigValueError(path, f"cannot resolve {host!r}: {exc}") from None
    if not infos:
        raise ConfigValueError(path, f"cannot resolve {host!r}")
    family, _, _, _, sockaddr = infos[0]
    return int(family), sockaddr


# -- command line -------------------------------------------------------------


async def _serve(config: RelayConfig, duration: float | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    relay = await Relay.start(config)
    print(
        f"relay {_fmt_addr(relay.address)} -> {_fmt_addr(relay.upstream)}: "
        f"profile {config.profile.name} ({config.profile.describe()}), seed {config.seed}",
        flush=True,
    )
    try:
        if duration is None:
            await stop.wait()
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
    finally:
        stats = relay.stats
        await relay.close()
        print(f"stats: {stats}", flush=True)
    return 0


def _fmt_addr(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
