"""Argument-parser pieces several subcommands share (one wording for one option)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

#: What a subcommand's ``func`` is: parsed arguments -> exit status.
Command = Callable[[argparse.Namespace], int]


def add_command(
    sub: Any,
    name: str,
    *,
    help: str,
    description: str,
    epilog: str | None = None,
    func: Command | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose description and epilog are printed as written (line breaks kept)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def add_listen(
    parser: argparse.ArgumentParser,
    *,
    help: str,
    option: str = "--listen",
    default: str | list[str] | None = None,
    repeatable: bool = False,
) -> None:
    """A ``HOST:PORT`` address to listen on; ``repeatable`` collects every occurrence."""
    if repeatable:
        parser.add_argument(
            option, action="append", default=default, metavar="HOST:PORT", help=help
        )
    else:
        parser.add_argument(option, default=default, metavar="HOST:PORT", help=help)


def add_debug_options(parser: argparse.ArgumentParser) -> None:
    """``--debug-log`` and ``--dump-payloads`` (the only way bodies reach a log)."""
    parser.add_argument(
        "--debug-log", action="store_true", help="log at DEBUG level (still no tokens or bodies)"
    )
    parser.add_argument(
        "--dump-payloads",
        action="store_true",
        help="log every message before and after translation, with sizes and bodies "
        "(also enabled by SYNAPSE_COAP_DUMP_PAYLOADS=1); for debugging only",
    )
