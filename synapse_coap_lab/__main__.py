"""``python -m synapse_coap_lab`` (what ``scripts/demo`` runs): the federation demo, two
homeservers over CoAP+Noise beside two over stock HTTPS.

The demo is tooling, not product: it lives beside the package, outside the
runtime wheel (it needs a checkout: ``scripts/setup`` installs it in develop
mode).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

DESCRIPTION = """\
Run two Synapse homeservers that federate over CoAP+Noise (the synapse-coap
module, no HTTP listener at all) and, beside them, two stock Synapse
homeservers that federate over HTTPS, on loopback. The same scenario plays on
both pairs:

  @alice (server A) joins @bob's public room on server B over federation
  (first contact: signing-key fetch, make_join, send_join); then N messages
  alice -> bob and N bob -> alice, each awaited until it arrives in the other
  side's /sync; then a profile lookup across the servers.

For each transaction it prints the bytes exchanged between the two
homeservers at the IP level (IP and UDP/TCP headers included) on each stack,
and the ratio HTTPS/CoAP. CoAP datagrams are counted exactly by a lab relay
that sits between the two CoAP servers; HTTPS packets are captured on
loopback with tshark (without tshark, or without the right to capture, they
are estimated from a counting TCP proxy, and the report says so).

The table is also written as demo-bytes.csv and demo-summary.json in the
working directory. It takes a minute or two (four Synapse processes start).
See docs/demo.md.
"""

EPILOG = """\
examples:
  scripts/demo                     # 5 messages each way, temporary directory
  scripts/demo --messages 20 --workdir ./demo-out --keep
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        type=Path,
        default=None,
        help="where the homeservers live and the report is written "
        "(default: a new directory under the system temp dir)",
    )
    parser.add_argument(
        "--messages",
        metavar="N",
        type=int,
        default=5,
        help="messages sent each way, alice -> bob then bob -> alice (default: 5)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the homeservers' configs, logs and databases in DIR "
        "(they are kept anyway when something fails)",
    )
    parser.add_argument(
        "--count",
        choices=("auto", "tshark", "estimate"),
        default="auto",
        help="how to count the HTTPS traffic: a tshark capture, an estimate from a "
        "counting TCP proxy, or auto (tshark when it can capture; default)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log the demo's own debug messages"
    )
    return parser


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> int:
    from synapse_coap_lab.demo import run_demo

    if args.messages < 1:
        print("demo: --messages must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="synapse-coap-demo-"))
    # SIGTERM cleans up like Ctrl-C: every homeserver, relay and capture is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        report = asyncio.run(
            run_demo(
                workdir,
                messages=args.messages,
                keep=args.keep,
                progress=progress,
                counting=args.count,
            )
        )
    except KeyboardInterrupt:
        print("demo: interrupted; every process was stopped", file=sys.stderr)
        return 130
    print()
    print(report.format_table())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return _demo(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
