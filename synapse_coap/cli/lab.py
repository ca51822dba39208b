"""Subcommands: relay (the constrained-link impairment relay)."""

from __future__ import annotations

from typing import Any

from synapse_coap.lab.relay_cli import add_relay_parser


def register(sub: Any) -> None:
    add_relay_parser(sub)
