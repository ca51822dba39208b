#!/usr/bin/env python3
"""Noise handshake cost: the handshake Driver now, against the transcript-replay driver before.

Until issue 16 the handshake ran on noiseprotocol 0.3.1, replaying the whole
transcript into a fresh NoiseConnection for every message (so that a forged
message could not change its state). :class:`ReplayDriver` below is that
driver, kept here only as the "before" of this comparison; the package's
:class:`synapse_coap.noise.handshake.Driver` is a small immutable Noise
implementation over ``cryptography`` that does each message's own tokens once.

Both drive the same complete handshakes (IK and XX, both sides, the same keys
and payloads) in one process, interleaved round by round, and print:

* handshakes per second (median of n rounds, with min and max) and the ratio;
* X25519 operations per handshake (key derivations and DH), counted with
  cProfile on one handshake of each kind.

The machine may be shared: read the ratio, not the absolute figures.

Usage: python bench/handshake.py [--rounds N] [--handshakes M]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from synapse_coap.noise.handshake import Driver
from synapse_coap.noise.keys import public_key


class ReplayDriver:
    """The handshake driver before issue 16: noiseprotocol, the transcript replayed per message."""

    def __init__(
        self,
        *,
        pattern: str,
        initiator: bool,
        static_private: bytes,
        remote_static: bytes | None,
        ephemeral_private: bytes,
        prologue: bytes = b"synapse-coap/1",
        transcript: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        self.pattern = pattern
        self.initiator = initiator
        self.static_private = static_private
        self.remote_static = remote_static
        self.ephemeral_private = ephemeral_private
        self.prologue = prologue
        self.transcript = transcript
        self.done = False

    def _replay(self) -> Any:
        from noise.backends.default.keypairs import KeyPair25519
        from noise.connection import Keypair, NoiseConnection

        name = f"Noise_{self.pattern}_25519_ChaChaPoly_BLAKE2s".encode()
        conn = NoiseConnection.from_name(name)
        conn.set_prologue(self.prologue)
        if self.initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, self.static_private)
        if self.remote_static is not None and self.initiator and self.pattern == "IK":
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, self.remote_static)
        conn.start_handshake()
        conn.noise_protocol.handshake_state.e = KeyPair25519.from_private_bytes(
            self.ephemeral_private
        )
        for op, data in self.transcript:
            if op == "w":
                conn.write_message(data)
            else:
                conn.read_message(data)
        return conn

    def _next(self, step: tuple[str, bytes], done: bool) -> ReplayDriver:
        new = ReplayDriver(
            pattern=self.pattern,
            initiator=self.initiator,
            static_private=self.static_private,
            remote_static=self.remote_static,
            ephemeral_private=self.ephemeral_private,
            prologue=self.prologue,
            transcript=(*self.transcript, step),
        )
        new.done = done
        return new

    def write(self, payload: bytes) -> tuple[ReplayDriver, bytes]:
        conn = self._replay()
        message = bytes(conn.write_message(payload))
        if conn.handshake_finished:  # the old driver read the split keys here
            _ = (conn.noise_protocol.cipher_state_encrypt.k, conn.get_handshake_hash())
        return self._next(("w", payload), conn.handshake_finished), message

    def read(self, message: bytes) -> tuple[ReplayDriver, bytes]:
        conn = self._replay()
        payload = bytes(conn.read_message(message))
        if conn.handshake_finished:
            _ = (conn.noise_protocol.cipher_state_encrypt.k, conn.get_handshake_hash())
        return self._next(("r", message), conn.handshake_finished), payload


PAYLOAD = b"\x03\x20" + bytes(32)  # a small application payload, as a request would carry


def handshake(cls: Callable[..., Any], pattern: str, keys: dict[str, bytes]) -> bytes:
    """One complete handshake, both sides; returns the last message (to keep it honest)."""
    init = cls(
        pattern=pattern,
        initiator=True,
        static_private=keys["is"],
        remote_static=keys["rs_pub"] if pattern == "IK" else None,
        ephemeral_private=keys["ie"],
    )
    resp = cls(
        pattern=pattern,
        initiator=False,
        static_private=keys["rs"],
        remote_static=None,
        ephemeral_private=keys["re"],
    )
    steps = 2 if pattern == "IK" else 3
    writer, reader = init, resp
    message = b""
    for _ in range(steps):
        writer, message = writer.write(PAYLOAD)
        reader, _payload = reader.read(message)
        writer, reader = reader, writer
    return message


#: Static keys stay the same across handshakes, as an endpoint's do.
STATIC = {"is": os.urandom(32), "rs": os.urandom(32)}


def fresh_keys() -> dict[str, bytes]:
    """The two static keys, and fresh ephemeral keys."""
    return {
        **STATIC,
        "rs_pub": public_key(STATIC["rs"]),
        "ie": os.urandom(32),
        "re": os.urandom(32),
    }


def x25519_ops(cls: Callable[..., Any], pattern: str) -> int:
    """X25519 operations in one handshake, both sides (static keys already loaded).

    Counted: loading a private key (cryptography derives its public key then, a
    scalar multiplication) and each exchange.
    """
    keys = fresh_keys()
    handshake(cls, pattern, fresh_keys())  # load the static keys, as a running endpoint has
    prof = cProfile.Profile()
    prof.enable()
    handshake(cls, pattern, keys)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = 0
    for (_file, _line, func), (calls, *_rest) in stats.items():
        if "x25519.from_private_bytes" in func or (
            "X25519PrivateKey" in func and "exchange" in func
        ):
            total += calls
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per driver (n)")
    parser.add_argument("--handshakes", type=int, default=200, help="handshakes per round")
    args = parser.parse_args()
    drivers: dict[str, Callable[..., Any]] = {"before (replay)": ReplayDriver, "after": Driver}
    keys = [fresh_keys() for _ in range(args.handshakes)]
    print(
        f"Noise handshakes per second, both sides, {args.handshakes} per round, "
        f"n={args.rounds} rounds interleaved (shared machine: compare the ratios)"
    )
    print(
        f"{'pattern':8} {'driver':16} {'median/s':>9} {'min/s':>9} {'max/s':>9} {'X25519 ops':>10}"
    )
    for pattern in ("IK", "XX"):
        rates: dict[str, list[float]] = {name: [] for name in drivers}
        for _ in range(args.rounds):
            for name, cls in drivers.items():
                t0 = time.perf_counter()
                for k in keys:
                    handshake(cls, pattern, k)
                rates[name].append(args.handshakes / (time.perf_counter() - t0))
        for name, cls in drivers.items():
            r = rates[name]
            print(
                f"{pattern:8} {name:16} {statistics.median(r):9.0f} {min(r):9.0f} "
                f"{max(r):9.0f} {x25519_ops(cls, pattern):10d}"
            )
        ratio = statistics.median(rates["after"]) / statistics.median(rates["before (replay)"])
        print(f"{pattern:8} after/before: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
