"""Subcommands: ``keygen`` and ``pubkey`` (X25519 static keys for the Noise layer)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from synapse_coap.errors import ConfigValueError
from synapse_coap.noise.keys import (
    encode_public,
    generate_private_key,
    public_key,
    read_key_file,
    write_key_file,
)
from synapse_coap.noise.trust import fingerprint


def register(sub: Any) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="write a new X25519 private key file (mode 0600)",
        description=(
            "Generate a static X25519 key for the Noise session layer. The file is "
            "created with mode 0600 and an existing file is never overwritten. "
            "The public key is printed (unpadded base64) for pinning by peers."
        ),
    )
    keygen.add_argument("--out", required=True, metavar="PATH", help="key file to create")
    keygen.set_defaults(func=_keygen)
    pubkey = sub.add_parser(
        "pubkey",
        help="print the public key of a private key file",
        description="Print the public key of PATH as one line of unpadded base64.",
    )
    pubkey.add_argument("path", metavar="PATH", help="private key file (from keygen)")
    pubkey.set_defaults(func=_pubkey)


def _keygen(args: argparse.Namespace) -> int:
    private = generate_private_key()
    try:
        write_key_file(args.out, private)
    except ConfigValueError as exc:
        print(f"synapse-coap keygen: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"synapse-coap keygen: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    pub = public_key(private)
    print(encode_public(pub))
    print(f"wrote {args.out} (fingerprint {fingerprint(pub)})", file=sys.stderr)
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    try:
        private = read_key_file(args.path)
    except ConfigValueError as exc:
        print(f"synapse-coap pubkey: {exc}", file=sys.stderr)
        return 1
    print(encode_public(public_key(private)))
    return 0
