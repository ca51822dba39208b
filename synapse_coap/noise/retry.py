"""Stateless retry cookies: address validation before any handshake state exists.

While half-open handshake state is under pressure, a responder answers a first
handshake message (IK1/XX1) with a *retry* instead of doing the handshake, as
QUIC's Retry and DTLS's HelloVerifyRequest do. The initiator sends its message
again, wrapped with the cookie; the cookie proves that it receives datagrams at
its source address. The responder keeps nothing between the two::

    RETRY        0x86  initiator sid(2) || cookie(18)                 (21 bytes)
    COOKIE_ECHO  0x87  cookie(18) || the first message (0x81 / 0x83 ...)

    cookie = time(2) || HMAC-SHA256(secret, "retry" || time || host || port || e)[:16]

``time`` counts :data:`TIME_UNIT` seconds of the responder's clock (mod 2^16);
a cookie is accepted for :data:`COOKIE_LIFETIME` seconds. ``e`` is the
initiator's ephemeral key from the first message, so a cookie validates one
handshake from one address and port. ``secret`` is random per endpoint: a
restart invalidates outstanding cookies (the initiator then gets a new one).
"""

from __future__ import annotations

import hashlib
import hmac

from synapse_coap.noise.ratelimit import address_key

RETRY = 0x86
COOKIE_ECHO = 0x87
TIME_UNIT = 4.0
#: Seconds a cookie stays valid: a round trip at 100 bit/s with a full-size first
#: message (~1,400 bytes = 112 s one way is the worst case we accept).
COOKIE_LIFETIME = 240.0
MAC_LEN = 16
COOKIE_LEN = 2 + MAC_LEN
#: Bytes a COOKIE_ECHO adds to the first message it carries.
ECHO_OVERHEAD = 1 + COOKIE_LEN
RETRY_LEN = 1 + 2 + COOKIE_LEN


def _mac(secret: bytes, stamp: bytes, host: str, port: int, ephemeral: bytes) -> bytes:
    msg = b"retry" + stamp + host.encode() + b"\x00" + port.to_bytes(2, "big") + ephemeral
    return hmac.digest(secret, msg, hashlib.sha256)[:MAC_LEN]


def mint(secret: bytes, now: float, host: str, port: int, ephemeral: bytes) -> bytes:
    stamp = (int(now // TIME_UNIT) & 0xFFFF).to_bytes(2, "big")
    return stamp + _mac(secret, stamp, host, port, ephemeral)


def verify(
    secret: bytes, now: float, cookie: bytes, host: str, port: int, ephemeral: bytes
) -> bool:
    if len(cookie) != COOKIE_LEN:
        return False
    stamp = cookie[:2]
    age = (int(now // TIME_UNIT) - int.from_bytes(stamp, "big")) & 0xFFFF
    if age * TIME_UNIT > COOKIE_LIFETIME:
        return False
    return hmac.compare_digest(cookie[2:], _mac(secret, stamp, host, port, ephemeral))


def retry_datagram(initiator_sid: bytes, cookie: bytes) -> bytes:
    return bytes([RETRY]) + initiator_sid + cookie


def prefix_key(host: str) -> str:
    """The half-open accounting key of a source: its IPv4 /24 or IPv6 /48."""
    return address_key(host, 24, 48)
