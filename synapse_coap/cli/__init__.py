"""``synapse-coap``: the command line.

Each subcommand lives in its own module here and exposes
``register(subparsers)``; this module only assembles them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from synapse_coap import __version__
from synapse_coap.cli import keys, lab, native, proxy, wire
from synapse_coap.native import status as native_status

DESCRIPTION = """\
Matrix over CoAP + CBOR + DEFLATE + Noise, for links as slow as 100 bit/s.

The Synapse module itself is loaded by Synapse (modules: - module:
synapse_coap.CoapModule in homeserver.yaml). This command holds the companions
and the operator's tools: key generation, the client sidecar, the gateway for
homeservers without the module, and wire debugging.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synapse-coap",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"synapse-coap {__version__}, {native_status().describe()}",
        help="the version, and whether this install runs the native (mypyc) build",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (keys, wire, proxy, lab, native):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
