"""Running the sidecar and the gateway as programs: configuration, keys, startup line, signals.

The translation itself lives in :mod:`synapse_coap.proxy.sidecar` and
:mod:`synapse_coap.proxy.gateway`; this module wires them to the CoAP
transport and to the operating system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import attrs
from aiohttp import web

from synapse_coap.errors import ConfigValueError, SynapseCoapError
from synapse_coap.mapping.push import PushConfig
from synapse_coap.proxy.common import format_host_port, parse_host_port
from synapse_coap.proxy.gateway import HttpDispatcher, parse_http_target
from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions
from synapse_coap.transport.link import LinkParameters

logger = logging.getLogger(__name__)

DEFAULT_COAP_PORT = 5683
SIDECAR_KEY_FILE = "sidecar.key"
TRUST_STORE_FILE = "trusted_servers.json"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/synapse-coap/sidecar`` (``~/.local/state/...`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "synapse-coap" / "sidecar"


@attrs.frozen
class HomeserverAddress:
    host: str
    port: int
    secure: bool

    @classmethod
    def parse(cls, text: str, path: str = "--homeserver") -> HomeserverAddress:
        """``coap://HOST[:PORT]`` (CoAP over Noise) or ``coap+plain://HOST[:PORT]`` (no encryption)."""
        parsed = urllib.parse.urlsplit(text.strip())
        if parsed.scheme not in ("coap", "coap+noise", "coap+plain"):
            raise ConfigValueError(
                path,
                f"expected coap://HOST[:PORT] (or coap+plain:// for unencrypted loopback tests), got {text!r}",
            )
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ConfigValueError(path, f"give only host and port, got {text!r}")
        host, port = parse_host_port(parsed.netloc, path, default_port=DEFAULT_COAP_PORT)
        return cls(host, port, parsed.scheme != "coap+plain")

    def __str__(self) -> str:
        scheme = "coap" if self.secure else "coap+plain"
        return f"{scheme}://{format_host_port(self.host, self.port)}"


#: The sidecar's default keep-alive interval (s): below the 2 minutes that RFC 4787
#: (REQ-5) requires a NAT to keep an idle UDP mapping, and Linux conntrack's 120 s.
#: A keep-alive is a 31-byte IPv4 datagram (a 3-byte NAT ping) while the sidecar sealed
#: a record within the last 3 intervals, else a 50-byte one (a 22-byte sealed record):
#: an idle client costs about 14 bytes a minute; behind a NAT with a shorter timeout,
#: set it lower.
DEFAULT_KEEPALIVE = 110.0


@attrs.frozen
class SidecarConfig:
    listen: tuple[str, int]
    homeserver: HomeserverAddress
    #: The homeserver's static public key (pinned), or None for trust on first use.
    server_key: bytes | None
    state_dir: Path
    #: The name the homeserver is known by in the trust store and the handshake.
    server_name: str
    options: SidecarOptions = attrs.field(factory=SidecarOptions)
    #: Seconds without sending anything to the homeserver after which the sidecar sends
    #: a keep-alive (None = never); see :data:`DEFAULT_KEEPALIVE`.
    keepalive: float | None = DEFAULT_KEEPALIVE
    #: Keep-alives may be 3-byte NAT pings (``--no-keepalive-ping``: always sealed records).
    keepalive_ping: bool = True
    #: More listeners of the same homeserver (``--homeserver`` repeated): the sidecar
    #: moves to the next one when its current one stops answering.
    alternates: tuple[HomeserverAddress, ...] = ()
    #: Seconds an ordinary request waits on one listener before the next is tried.
    failover_after: float = 15.0
    #: Learn more listeners from the homeserver's /.well-known/matrix/client at start
    #: and after each failover (``--learn-listeners``; :mod:`synapse_coap.proxy.addressbook`).
    learn_listeners: bool = False
    #: Hosts of ``--homeserver`` entries (names given without a port) whose listeners
    #: are looked up as DNS SRV ``_matrix-coap._udp.HOST`` (:mod:`synapse_coap.proxy.resolver`).
    srv_hosts: tuple[str, ...] = ()
    #: Nameservers for those lookups (``--dns-server``); empty: /etc/resolv.conf.
    dns_servers: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class GatewayConfig:
    listen: tuple[tuple[str, int], ...]
    http_target: str
    key_path: Path
    server_name: str | None = None
    plain_listen: tuple[tuple[str, int], ...] = ()
    dump_payloads: bool = False
    request_timeout: float = 120.0
    long_poll_slack: float = 30.0
    verify_tls: bool = True
    push: PushConfig = attrs.field(factory=PushConfig)
    #: The CoAP link's parameters (``--link NAME=VALUE``; the module's ``link:``).
    link: LinkParameters = attrs.field(factory=LinkParameters)
    #: Pinned client (initiator) keys by name; with ``only_pinned_clients`` no other
    #: key may open a session (as the module's ``trust.accept_unknown_clients: false``).
    client_keys: tuple[tuple[str, bytes], ...] = ()
    only_pinned_clients: bool = False

    def __attrs_post_init__(self) -> None:
        if self.only_pinned_clients and not self.client_keys:
            raise ConfigValueError(
                "--only-pinned-clients", "needs at least one --client-key NAME=KEY"
            )


def load_server_key(value: str, path: str = "--server-key") -> bytes:
    """A homeserver public key given as base64 text, or as the path of a file holding it."""
    from synapse_coap.noise.keys import decode_public

    text = value.strip()
    candidate = Path(text)
    if candidate.is_file():
        text = candidate.read_text().strip()
    try:
        return decode_public(text)
    except (ValueError, SynapseCoapError) as e:
        raise ConfigValueError(
            path, f"not a Curve25519 public key in unpadded base64: {e}"
        ) from None


def ensure_state_dir(state_dir: Path) -> bytes:
    """Create the state dir (0700) and the sidecar's own static key (0600) on first start."""
    from synapse_coap.noise.keys import generate_private_key, read_key_file, write_key_file

    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        state_dir.chmod(0o700)
    key_path = state_dir / SIDECAR_KEY_FILE
    if not key_path.exists():
        write_key_file(key_path, generate_private_key())
        logger.info("generated the sidecar's static key in %s", key_path)
    return read_key_file(key_path)


async def _wait_for_signal(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


class RunningSidecar:
    """A started sidecar: the HTTP site, the CoAP client and the translation object."""

    def __init__(
        self, sidecar: Sidecar, runner: web.AppRunner, client: Any, address: tuple[str, int]
    ) -> None:
        self.sidecar = sidecar
        self.runner = runner
        self.client = client
        self.address = address
        #: the address book's request at start (``--learn-listeners``), if any
        self.learning: asyncio.Task[Any] | None = None
        #: the address book (``--learn-listeners`` or SRV), if any
        self.address_book: Any = None
        #: the listeners known at start (SRV targets resolved), in the order used
        self.listeners: tuple[HomeserverAddress, ...] = ()

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (or fail them), close the CoAP client."""
        if self.learning is not None:
            self.learning.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.learning
        if self.address_book is not None:
            await self.address_book.close()
        for site in list(self.runner.sites):
            await site.stop()
        await self.sidecar.drain()
        await self.runner.cleanup()
        await self.client.close()


async def start_sidecar(config: SidecarConfig, *, metrics: Any = None) -> RunningSidecar:
    from synapse_coap.noise.trust import FileTrustStore, TrustPolicy
    from synapse_coap.transport.client import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        CoapClient,
        Endpoint,
    )

    static_key = ensure_state_dir(config.state_dir)
    if config.server_key is not None:
        trust = TrustPolicy(pinned={config.server_name: config.server_key})
    else:
        trust = TrustPolicy(store=FileTrustStore(config.state_dir / TRUST_STORE_FILE))
    client = await CoapClient.create(
        static_key=static_key,
        trust=trust,
        metrics=metrics,
        keepalive_interval=config.keepalive if config.homeserver.secure else None,
        keepalive_ping=config.keepalive_ping,
    )

    def make_endpoint(address: HomeserverAddress) -> Any:
        # every listener of the homeserver: the same name and the same key
        return Endpoint(
            host=address.host,
            port=address.port,
            peer_name=config.server_name,
            static_key=config.server_key,
            secure=address.secure,
        )

    try:
        addresses, sources = await _resolve_listeners(config)
    except BaseException:
        await client.close()
        raise
    endpoints = [make_endpoint(address) for address in addresses]
    endpoint = endpoints[0]
    sender: Any = client
    if len(endpoints) > 1 or config.learn_listeners or sources:
        from synapse_coap.proxy.failover import FailoverSender
        from synapse_coap.transport.convert import default_codec_factory
        from synapse_coap.wire.context import WireContext

        sender = FailoverSender(
            client,
            endpoints,
            replay_safe=default_codec_factory(0, WireContext()).is_replay_safe,
            failover_after=config.failover_after,
        )
    sidecar = Sidecar(sender, endpoint, options=config.options)
    runner = web.AppRunner(
        sidecar.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=2.0
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.listen[0], config.listen[1])
        await site.start()
    except BaseException:
        await runner.cleanup()
        await client.close()
        raise
    bound = config.listen
    sockets = getattr(site._server, "sockets", None)
    if sockets:
        sockname = sockets[0].getsockname()
        bound = (str(sockname[0]), int(sockname[1]))
    running = RunningSidecar(sidecar, runner, client, bound)
    running.listeners = addresses
    if config.learn_listeners or sources:
        from synapse_coap.proxy.addressbook import AddressBook

        book = AddressBook(
            sender,
            addresses,
            make_endpoint,
            well_known=config.learn_listeners,
            srv=sources,
            timeout=config.failover_after * 4,
            min_interval=config.failover_after,
        )
        running.address_book = book
        running.learning = asyncio.ensure_future(book.start())
    return running


async def _resolve_listeners(
    config: SidecarConfig,
) -> tuple[tuple[HomeserverAddress, ...], list[tuple[Any, bool]]]:
    """The listeners to start with: every ``--homeserver``, those named in
    ``srv_hosts`` replaced by their SRV targets; and the SRV sources for the address book."""
    from synapse_coap.proxy.resolver import DnsResolver, SrvSource

    given = (config.homeserver, *config.alternates)
    if not config.srv_hosts:
        return given, []
    resolver = DnsResolver(config.dns_servers or None)
    found: list[HomeserverAddress] = []
    sources: list[tuple[Any, bool]] = []
    for address in given:
        if address.host not in config.srv_hosts:
            found.append(address)
            continue
        if any(source.host == address.host for source, _ in sources):
            continue  # (named twice: looked up once)
        source = SrvSource(address.host, resolver, default_port=address.port, clock=time.monotonic)
        listeners = await source.resolve()
        sources.append((source, address.secure))
        found.extend(HomeserverAddress(h, p, address.secure) for h, p in listeners.addresses)
    return tuple(dict.fromkeys(found)), sources


def sidecar_status_line(config: SidecarConfig, running: RunningSidecar) -> str:
    if config.server_key is not None:
        from synapse_coap.noise.trust import fingerprint

        trust = f"server key {fingerprint(config.server_key)}"
    elif config.homeserver.secure:
        trust = (
            f"server key by trust on first use (TOFU, store {config.state_dir / TRUST_STORE_FILE})"
        )
    else:
        trust = "NO ENCRYPTION (coap+plain)"
    via = ""
    if config.srv_hosts:
        via = f" at {', '.join(str(a) for a in running.listeners)}"
    return (
        f"synapse-coap sidecar: listening on http://{format_host_port(*running.address)}, "
        f"homeserver {config.homeserver}{via} ({config.server_name}), {trust}"
    )


async def run_sidecar(
    config: SidecarConfig,
    *,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    started: Callable[[RunningSidecar], Awaitable[None] | None] | None = None,
) -> int:
    stop = stop or asyncio.Event()
    running = await start_sidecar(config)
    print(sidecar_status_line(config, running), file=out, flush=True)
    if started is not None:
        result = started(running)
        if result is not None:
            await result
    try:
        await _wait_for_signal(stop)
    finally:
        logger.info("shutting down")
        await running.close()
    return 0


class RunningGateway:
    def __init__(self, server: Any, dispatcher: HttpDispatcher, public_key: bytes) -> None:
        self.server = server
        self.dispatcher = dispatcher
        self.public_key = public_key

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self.server.addresses)

    async def close(self) -> None:
        await self.server.close()
        await self.dispatcher.close()


async def start_gateway(config: GatewayConfig, *, metrics: Any = None) -> RunningGateway:
    from synapse_coap.noise.keys import public_key, read_key_file
    from synapse_coap.noise.trust import TrustPolicy
    from synapse_coap.transport.server import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        CoapServer,
        ServerConfig,
    )

    private = read_key_file(config.key_path)
    dispatcher = HttpDispatcher(
        config.http_target,
        request_timeout=config.request_timeout,
        long_poll_slack=config.long_poll_slack,
        dump_payloads=config.dump_payloads,
        verify_tls=config.verify_tls,
    )
    server_config = ServerConfig(
        listen=config.listen,
        plain_listen=config.plain_listen,
        static_key=private,
        server_name=config.server_name,
        payload_dump=config.dump_payloads,
        push=config.push,
        link=config.link,
        replay_state_path=f"{config.key_path}.replay",
        trust=TrustPolicy(
            pinned=dict(config.client_keys),
            accept_any_initiator=not config.only_pinned_clients,
        ),
    )
    try:
        server = await CoapServer.start(server_config, dispatcher, metrics=metrics)
    except BaseException:
        await dispatcher.close()
        raise
    return RunningGateway(server, dispatcher, public_key(private))


def gateway_status_line(config: GatewayConfig, running: RunningGateway) -> str:
    from synapse_coap.noise.keys import encode_public
    from synapse_coap.noise.trust import fingerprint

    addrs = ", ".join(f"coap://{format_host_port(h, p)}" for h, p in running.addresses)
    return (
        f"synapse-coap gateway: listening on {addrs}, forwarding to {parse_http_target(config.http_target)}, "
        f"server key {encode_public(running.public_key)} ({fingerprint(running.public_key)})"
        + (f", server name {config.server_name}" if config.server_name else "")
    )


async def run_gateway(
    config: GatewayConfig, *, out: TextIO = sys.stdout, stop: asyncio.Event | None = None
) -> int:
    stop = stop or asyncio.Event()
    running = await start_gateway(config)
    print(gateway_status_line(config, running), file=out, flush=True)
    try:
        await _wait_for_signal(stop)
    finally:
        logger.info("shutting down")
        await running.close()
    return 0
