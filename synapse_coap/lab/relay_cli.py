"""The ``synapse-coap relay`` command line (and ``python -m synapse_coap.lab``): options, the
config they make, and running the relay until interrupted, with its status and stats lines."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from synapse_coap.errors import ConfigValueError
from synapse_coap.lab.model import (
    PROFILES,
    RebindSchedule,
    get_profile,
)
from synapse_coap.lab.relay import Address, RelayConfig, _serve


def parse_hostport(text: str, path: str = "address") -> Address:
    """Parse ``host:port`` or ``[v6addr]:port``; :class:`ConfigValueError` otherwise."""
    host: str
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        if not sep:
            raise ConfigValueError(path, f"expected [host]:port, got {text!r}")
        port_text = rest
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigValueError(path, f"expected host:port or [v6addr]:port, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigValueError(path, f"bad port in {text!r}") from None
    if not host or not 0 <= port <= 65535:
        raise ConfigValueError(path, f"expected host:port with port 0-65535, got {text!r}")
    return (host, port)


RELAY_DESCRIPTION = """\
Run a UDP impairment relay (no root needed): clients send to --listen, the
relay forwards to --upstream and relays replies, applying a link profile
(rate with serialization delay, queue, latency, jitter, loss, duplication,
reordering, NAT rebinding). Decisions are reproducible for a given --seed.

profiles:
""" + "\n".join(f"  {name:10} {p.description}" for name, p in PROFILES.items())


def add_relay_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``relay`` subcommand to an argparse subparsers object."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "relay",
        help="run a UDP impairment relay (link emulator, no root)",
        description=RELAY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_relay_arguments(parser)
    parser.set_defaults(func=run_relay_command)
    return parser


def _add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, help="HOST:PORT clients send to")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server")
    parser.add_argument(
        "--profile", default="lan", help=f"link profile ({', '.join(PROFILES)}); default lan"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group = parser.add_argument_group("overrides (both directions)")
    group.add_argument("--rate", type=float, help="bit/s at the IP level (0 = unlimited)")
    group.add_argument("--latency", type=float, help="one-way latency, seconds")
    group.add_argument("--jitter", help="jitter: seconds, or a percentage of latency ('40%%')")
    group.add_argument("--loss", type=float, help="loss probability 0-1")
    group.add_argument("--duplicate", type=float, help="duplication probability 0-1")
    group.add_argument("--reorder", type=float, help="reordering probability 0-1")
    group.add_argument("--queue-packets", type=int, help="queue limit in datagrams (0 = none)")
    group.add_argument("--queue-bytes", type=int, help="queue limit in IP bytes (0 = none)")
    group.add_argument("--rebind-every", type=float, help="NAT rebind every N seconds")
    group.add_argument("--rebind-at", help="NAT rebind at these seconds, comma separated")
    group.add_argument(
        "--overhead", type=int, help="IP+UDP header bytes per datagram (default by family)"
    )
    parser.add_argument(
        "--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event")


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    """Build a :class:`RelayConfig` from parsed ``relay`` arguments."""
    profile = get_profile(args.profile)
    changes: dict[str, Any] = {}
    if args.rate is not None:
        changes["rate"] = args.rate if args.rate > 0 else None
    if args.latency is not None:
        changes["latency"] = args.latency
    if args.jitter is not None:
        text = str(args.jitter).strip()
        try:
            if text.endswith("%"):
                changes["jitter_fraction"] = float(text[:-1]) / 100.0
                changes["jitter"] = 0.0
            else:
                changes["jitter"] = float(text)
                changes["jitter_fraction"] = 0.0
        except ValueError:
            raise ConfigValueError("jitter", f"expected seconds or N%, got {text!r}") from None
    for name in ("loss", "duplicate", "reorder"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.queue_packets is not None:
        changes["queue_packets"] = args.queue_packets or None
    if args.queue_bytes is not None:
        changes["queue_bytes"] = args.queue_bytes or None
    profile = profile.with_changes(**changes)
    if args.rebind_every is not None or args.rebind_at:
        times: tuple[float, ...] = ()
        if args.rebind_at:
            try:
                times = tuple(float(t) for t in str(args.rebind_at).split(",") if t.strip())
            except ValueError:
                raise ConfigValueError("rebind_at", "expected comma-separated seconds") from None
        profile = profile.with_rebind(RebindSchedule(times=times, every=args.rebind_every))
    return RelayConfig(
        listen=parse_hostport(args.listen, "listen"),
        upstream=parse_hostport(args.upstream, "upstream"),
        profile=profile,
        seed=args.seed,
        header_overhead=args.overhead,
    )


def run_relay_command(args: argparse.Namespace) -> int:
    """The ``relay`` subcommand: run until Ctrl-C / SIGTERM / --duration."""
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except ConfigValueError as exc:
        print(f"synapse-coap relay: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config, args.duration))
    except ConfigValueError as exc:
        print(f"synapse-coap relay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"synapse-coap relay: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m synapse_coap.lab --listen ... --upstream ...``."""
    parser = argparse.ArgumentParser(
        prog="synapse-coap relay",
        description=RELAY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_relay_arguments(parser)
    return run_relay_command(parser.parse_args(argv))
