"""Subcommands ``sidecar`` (HTTP -> CoAP for unmodified clients) and ``gateway`` (CoAP -> HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.parse
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from synapse_coap.cli.common import add_command, add_debug_options, add_listen
from synapse_coap.errors import ConfigValueError, SynapseCoapError

SIDECAR_DESCRIPTION = """\
Run beside a Matrix client: speaks HTTP on localhost, so unmodified clients
(Element Desktop/Web, matrix-nio, curl) work, and carries every client-server
request over CoAP + Noise to a homeserver that loads the synapse-coap module
(or to a `synapse-coap gateway`).

Point the client's homeserver URL at http://LISTEN (e.g. http://127.0.0.1:8008).

Trust: give the homeserver's static public key with --server-key (printed by
the module at startup, or by `synapse-coap gateway`), or accept it on first
contact with --trust-on-first-use; it is then remembered in the state dir and a
changed key is refused with a message naming both fingerprints.

Errors a client understands: 502 (M_UNKNOWN) when the link is down, 504 when
the response does not arrive in time, 503 while shutting down. Cacheable GETs
(/versions, capabilities, profiles, thumbnails) are answered from a per-token
cache while fresh (Max-Age). Stop with SIGINT/SIGTERM: in-flight requests get a
grace period, then fail with 503.

Logs never contain access tokens or bodies, unless --dump-payloads (or the
environment variable SYNAPSE_COAP_DUMP_PAYLOADS=1) is given.
"""

SIDECAR_EPILOG = """\
examples:
  synapse-coap sidecar --homeserver coap://hs.example.org --server-key 3q2+7w...
      (SRV _matrix-coap._udp.hs.example.org names the listeners; else hs.example.org:5683)
  synapse-coap sidecar --listen 127.0.0.1:8448 --homeserver coap://[2001:db8::1]:5683 \\
      --trust-on-first-use --server-name example.org
"""

GATEWAY_DESCRIPTION = """\
Serve CoAP + Noise in front of a homeserver that does not load the module
(another Synapse, Dendrite, Conduit...): every request arriving over CoAP is
forwarded as HTTP to --http-target, client-server and federation alike. The
exact request target bytes are forwarded and X-Matrix signatures pass through
untouched; X-Forwarded-For carries the CoAP peer's address (set x_forwarded:
true on the homeserver's listener to use it).

Upstream timeout -> 504, upstream unreachable -> 502, with Matrix JSON error
bodies. The key file is the gateway's static Noise key (create it with
`synapse-coap keygen --out PATH`); the startup line prints the public key that
sidecars and peers pin with --server-key.
"""

GATEWAY_EPILOG = """\
example:
  synapse-coap gateway --listen [::]:5683 --http-target http://127.0.0.1:8008 \\
      --key /etc/synapse-coap/gateway.key --server-name example.org
"""


def _proxy_options(parser: argparse.ArgumentParser) -> None:
    """What the sidecar and the gateway both take: logging and waiting for responses."""
    add_debug_options(parser)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for an ordinary response (default: %(default)s)",
    )
    parser.add_argument(
        "--long-poll-slack",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="extra wait on top of a long-poll's own timeout parameter, e.g. /sync?timeout=30000 "
        "(default: %(default)s)",
    )


def register(sub: Any) -> None:
    sidecar = add_command(
        sub,
        "sidecar",
        help="HTTP on localhost -> CoAP+Noise: run an unmodified Matrix client over the link",
        description=SIDECAR_DESCRIPTION,
        epilog=SIDECAR_EPILOG,
        func=run_sidecar_command,
    )
    add_listen(
        sidecar,
        default="127.0.0.1:8008",
        help="HTTP address for the client (default: %(default)s; keep it on loopback)",
    )
    sidecar.add_argument(
        "--homeserver",
        required=True,
        action="append",
        metavar="coap://HOST[:PORT]",
        help="the homeserver's CoAP listener (module or gateway); port defaults to 5683; "
        "coap+plain:// sends without encryption (loopback tests only). A host name without "
        "a port is looked up as DNS SRV _matrix-coap._udp.HOST first: every target is a "
        "listener, in RFC 2782 order (priority, then weighted random), and without a record "
        "HOST:5683 is used. Repeat it for a homeserver with several listeners (workers): "
        "the first is used, and the next takes over when the current one stops answering",
    )
    sidecar.add_argument(
        "--learn-listeners",
        action="store_true",
        help="at start and whenever a listener stops answering, ask the homeserver (over "
        "CoAP) for /.well-known/matrix/client and add the listeners it publishes under "
        '"io.synapse_coap": {"listeners": [...]} to those the sidecar moves to (same '
        "server name and key; at most 16 are learned)",
    )
    sidecar.add_argument(
        "--no-srv",
        action="store_true",
        help="do not look up DNS SRV records: a --homeserver without a port is HOST:5683",
    )
    sidecar.add_argument(
        "--dns-server",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="the nameserver for SRV lookups (repeatable; default: the nameservers of "
        "/etc/resolv.conf). UDP only: a truncated answer is used as far as it came",
    )
    sidecar.add_argument(
        "--failover-after",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="with several --homeserver listeners: how long an ordinary request waits on "
        "one before it is sent to the next (default: %(default)s)",
    )
    trust = sidecar.add_mutually_exclusive_group(required=True)
    trust.add_argument(
        "--server-key",
        metavar="KEY",
        help="the homeserver's static public key (unpadded base64, or a file holding it)",
    )
    trust.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="accept the homeserver's key on first contact and remember it in the state dir",
    )
    sidecar.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the sidecar keeps its own static key (created 0600 on first start) and the "
        "trust store (default: $XDG_STATE_HOME/synapse-coap/sidecar)",
    )
    sidecar.add_argument(
        "--server-name",
        metavar="NAME",
        help="the homeserver's name for the trust store and handshake (default: HOST:PORT of --homeserver)",
    )
    sidecar.add_argument(
        "--no-cache", action="store_true", help="do not answer any request from the response cache"
    )
    sidecar.add_argument(
        "--no-push",
        action="store_true",
        help="carry every /sync long-poll over the link instead of answering it from a push "
        "registration (docs/clients.md)",
    )
    sidecar.add_argument(
        "--push-refresh",
        type=float,
        default=None,
        metavar="SECONDS",
        help="renew the push registration after this long without a notification; 0: never. "
        "Default: never with one --homeserver (a homeserver that lost it answers the next "
        "keep-alive and the sidecar registers again at once), 240 with several (a listener "
        "that died answers nothing: the renewal finds out and the sidecar moves on)",
    )
    sidecar.add_argument(
        "--keepalive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="send a keep-alive after this long without sending anything to the "
        "homeserver, so NAT mappings stay open while the client is idle: a 31-byte NAT ping, "
        "or a 50-byte sealed record when nothing was sealed for 3 intervals; "
        "0 turns it off (default: 110, below the 2-minute minimum NAT timeout of RFC 4787)",
    )
    sidecar.add_argument(
        "--no-keepalive-ping",
        action="store_true",
        help="make every keep-alive a sealed 50-byte record, never a 31-byte unauthenticated "
        "NAT ping (for a path that drops tiny datagrams; costs 19 bytes more per keep-alive)",
    )
    sidecar.add_argument(
        "--no-short-txn-ids",
        action="store_true",
        help="send the client's transaction ids as they are (default: long ids such as "
        "matrix-nio's UUIDs go as 8-character digests of the access token and the id, "
        "which keeps retries idempotent across sidecar restarts)",
    )
    sidecar.add_argument(
        "--max-body-size",
        type=int,
        default=50 * 1024 * 1024,
        metavar="BYTES",
        help="largest request body accepted from the client (default: %(default)s)",
    )
    _proxy_options(sidecar)

    gateway = add_command(
        sub,
        "gateway",
        help="CoAP+Noise -> HTTP: put any homeserver without the module on the link",
        description=GATEWAY_DESCRIPTION,
        epilog=GATEWAY_EPILOG,
        func=run_gateway_command,
    )
    add_listen(
        gateway,
        repeatable=True,
        help="UDP address for CoAP over Noise; repeatable (default: [::]:5683)",
    )
    gateway.add_argument(
        "--http-target",
        required=True,
        metavar="URL",
        help="the homeserver's HTTP listener, e.g. http://127.0.0.1:8008",
    )
    gateway.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="PATH",
        help="the gateway's static key file (mode 0600)",
    )
    gateway.add_argument(
        "--server-name",
        metavar="NAME",
        help="the Matrix server name announced to peers in the handshake",
    )
    add_listen(
        gateway,
        option="--plain-listen",
        repeatable=True,
        default=[],
        help="also serve plain CoAP without encryption (for loopback tooling like coap-client); repeatable",
    )
    gateway.add_argument(
        "--no-push",
        action="store_true",
        help="do not accept /sync push (Observe) registrations",
    )
    gateway.add_argument(
        "--push-max-per-session",
        type=int,
        default=4,
        metavar="N",
        help="push registrations one client session may hold (default: %(default)s)",
    )
    gateway.add_argument(
        "--push-max-per-source",
        type=int,
        default=16,
        metavar="N",
        help="push registrations one source address may hold (default: %(default)s)",
    )
    gateway.add_argument(
        "--push-poll-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="each /sync long-poll the gateway issues to the homeserver for a push "
        "registration (local, never on the link) (default: %(default)s)",
    )
    gateway.add_argument(
        "--push-park-retry",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a notification the client did not acknowledge is parked and sent again as "
        "soon as the client is heard from, else after this long, doubling up to 10x "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--push-park-timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="a registration whose notification stayed parked this long is dropped "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--push-echo-hold",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a /sync result holding only the client's own echoes waits up to this long "
        "for the next news and goes out with it, in one notification (0: at once) "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a CoAP link parameter, as the module's link: settings (docs/link-tuning.md), "
        "e.g. --link ack_timeout=4 --link max_retransmit=6; repeatable",
    )
    gateway.add_argument(
        "--client-key",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help="pin a client's Noise public key (base64, or a file holding it) under NAME; "
        "repeatable",
    )
    gateway.add_argument(
        "--only-pinned-clients",
        action="store_true",
        help="refuse handshakes from any client key not given with --client-key "
        "(like the module's trust.accept_unknown_clients: false)",
    )
    gateway.add_argument(
        "--insecure-upstream",
        action="store_true",
        help="do not verify the TLS certificate of an https:// --http-target",
    )
    _proxy_options(gateway)


def _fail(message: str) -> int:
    print(f"synapse-coap: error: {message}", file=sys.stderr)
    return 2


def _serve(service: Coroutine[Any, Any, int]) -> int:
    """Run a sidecar or gateway until it stops; its exit status."""
    from synapse_coap.transport.aiocoap_compat import check as check_aiocoap

    try:
        check_aiocoap()  # aiocoap's private pieces are there (else: version and piece named)
    except SynapseCoapError as e:
        service.close()
        return _fail(str(e))
    try:
        return asyncio.run(service)
    except (SynapseCoapError, OSError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


def run_sidecar_command(args: argparse.Namespace) -> int:
    from synapse_coap.proxy.common import configure_logging, dump_enabled, parse_host_port
    from synapse_coap.proxy.push import PushOptions, push_refresh
    from synapse_coap.proxy.resolver import parse_dns_server
    from synapse_coap.proxy.runner import (
        HomeserverAddress,
        SidecarConfig,
        default_state_dir,
        load_server_key,
        run_sidecar,
    )
    from synapse_coap.proxy.sidecar import SidecarOptions

    configure_logging(args.debug_log)
    try:
        if not args.failover_after > 0:
            raise ConfigValueError("--failover-after", "must be a number of seconds > 0")
        addresses = [HomeserverAddress.parse(text) for text in args.homeserver]
        homeserver = addresses[0]
        srv_hosts = () if args.no_srv else _srv_hosts(args.homeserver, addresses)
        config = SidecarConfig(
            listen=parse_host_port(args.listen, "--listen"),
            homeserver=homeserver,
            alternates=tuple(addresses[1:]),
            failover_after=args.failover_after,
            learn_listeners=args.learn_listeners,
            srv_hosts=srv_hosts,
            dns_servers=tuple(parse_dns_server(text) for text in args.dns_server),
            server_key=load_server_key(args.server_key) if args.server_key else None,
            state_dir=args.state_dir or default_state_dir(),
            server_name=args.server_name or f"{homeserver.host}:{homeserver.port}",
            keepalive=_keepalive(args.keepalive),
            keepalive_ping=not args.no_keepalive_ping,
            options=SidecarOptions(
                request_timeout=args.request_timeout,
                long_poll_slack=args.long_poll_slack,
                max_body_size=args.max_body_size,
                cache=not args.no_cache,
                dump_payloads=dump_enabled(args.dump_payloads),
                push=PushOptions(
                    enabled=not args.no_push,
                    # (learned listeners count as several: a dead one must be noticed)
                    refresh=push_refresh(
                        args.push_refresh,
                        max(len(addresses), 2 if args.learn_listeners or srv_hosts else 1),
                    ),
                ),
                short_txn_ids=not args.no_short_txn_ids,
            ),
        )
    except ConfigValueError as e:
        return _fail(str(e))
    return _serve(run_sidecar(config))


def _srv_hosts(texts: list[str], addresses: list[Any]) -> tuple[str, ...]:
    """The hosts of the ``--homeserver`` values that name a host without a port (those
    are looked up as SRV), in order."""
    from synapse_coap.wire.dns import is_ip_literal

    hosts: list[str] = []
    for text, address in zip(texts, addresses, strict=True):
        if urllib.parse.urlsplit(text.strip()).port is None and not is_ip_literal(address.host):
            hosts.append(address.host)
    return tuple(dict.fromkeys(hosts))


def _keepalive(value: float | None) -> float | None:
    from synapse_coap.proxy.runner import DEFAULT_KEEPALIVE

    if value is None:
        return DEFAULT_KEEPALIVE
    if not value >= 0 or value == float("inf"):
        raise ConfigValueError("--keepalive", f"must be a number of seconds >= 0, got {value!r}")
    return value or None


def run_gateway_command(args: argparse.Namespace) -> int:
    from synapse_coap.mapping.push import PushConfig
    from synapse_coap.proxy.common import configure_logging, dump_enabled, parse_host_port
    from synapse_coap.proxy.gateway import parse_http_target
    from synapse_coap.proxy.runner import GatewayConfig, run_gateway

    configure_logging(args.debug_log)
    try:
        parse_http_target(args.http_target)
        config = GatewayConfig(
            listen=tuple(
                parse_host_port(a, "--listen", default_port=5683)
                for a in (args.listen or ["[::]:5683"])
            ),
            plain_listen=tuple(
                parse_host_port(a, "--plain-listen", default_port=5683) for a in args.plain_listen
            ),
            http_target=args.http_target,
            key_path=args.key,
            server_name=args.server_name,
            dump_payloads=dump_enabled(args.dump_payloads),
            request_timeout=args.request_timeout,
            long_poll_slack=args.long_poll_slack,
            verify_tls=not args.insecure_upstream,
            push=PushConfig(
                enabled=not args.no_push,
                max_per_session=args.push_max_per_session,
                max_per_source=args.push_max_per_source,
                poll_timeout=args.push_poll_timeout,
                park_retry=args.push_park_retry,
                park_timeout=args.push_park_timeout,
                echo_hold=args.push_echo_hold,
            ),
            link=_link_parameters(args.link),
            client_keys=tuple(_client_key(v) for v in args.client_key),
            only_pinned_clients=args.only_pinned_clients,
        )
    except ConfigValueError as e:
        return _fail(str(e))
    return _serve(run_gateway(config))


def _link_parameters(values: list[str]) -> Any:
    """``--link NAME=VALUE`` options as LinkParameters (numbers parsed; ConfigValueError
    naming ``--link.NAME`` and the allowed values otherwise)."""
    from synapse_coap.transport.link import LinkParameters

    settings: dict[str, Any] = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or not name or not raw:
            raise ConfigValueError("--link", f"expected NAME=VALUE, got {value!r}")
        parsed: Any = raw
        for kind in (int, float):
            try:
                parsed = kind(raw)
                break
            except ValueError:
                continue
        settings[name.strip()] = parsed
    return LinkParameters.from_config(settings, path="--link")


def _client_key(value: str) -> tuple[str, bytes]:
    from synapse_coap.proxy.runner import load_server_key

    name, sep, key = value.partition("=")
    if not sep or not name or not key:
        raise ConfigValueError("--client-key", f"expected NAME=KEY, got {value!r}")
    return name, load_server_key(key, "--client-key")
