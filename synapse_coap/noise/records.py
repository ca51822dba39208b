"""Transport records: header, packet numbers, replay window, key schedule.

Byte layout (see docs/security.md for the full description)::

    byte 0   1 1 K C L L E 0   K = key phase, C = control record,
                               LL = packet-number length - 1 (0..2 -> 1..3 bytes; 3 reserved),
                               E = key-phase echo (the sender's current *receive* phase),
                               bit 0 reserved (must be 0)
    1..2     receiver-chosen session id, big endian
    3..      truncated packet number (1..3 bytes, big endian)
    rest     ChaCha20-Poly1305 ciphertext || 16-byte tag

The AAD is the whole header (bytes 0 .. end of packet number). The nonce is
the full 64-bit packet number (4 zero bytes || 8 bytes little endian, the
Noise ChaChaPoly nonce layout). Packet numbers count up from 0 for the life of
a session in each direction and are never reused, across key phases too.

First-byte classes of every datagram on a secure port::

    0b00xxxxxx  reserved (dropped)
    0b01xxxxxx  a plain CoAP message (version 1): dropped, "plain_coap"
    0b10000TTT  a handshake message, TTT = 1..5 (see handshake.py)
    0b11xxxxxx  a transport record (this module)
"""

from __future__ import annotations

import enum
import importlib
from typing import Any, Protocol

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

try:  # ChaCha20-Poly1305 through libsodium (noise/_caead.c: the same construction and bytes)
    _CAEAD: Any = importlib.import_module("synapse_coap.noise._caead")
except ImportError:  # no native build, or SYNAPSE_COAP_PURE=1: cryptography's
    _CAEAD = None

TAG_LEN = 16
SID_LEN = 2
RECORD_FLAG = 0xC0
FLAG_KEY_PHASE = 0x20
FLAG_CONTROL = 0x10
PN_LEN_MASK = 0x0C
FLAG_ECHO = 0x02
RESERVED_MASK = 0x01
MIN_HEADER = 1 + SID_LEN + 1
#: Largest record overhead (header with a 3-byte packet number + tag).
MAX_OVERHEAD = 1 + SID_LEN + 3 + TAG_LEN
#: The usual record overhead (2-byte packet number).
DATA_OVERHEAD = 1 + SID_LEN + 2 + TAG_LEN
MAX_PN = (1 << 62) - 1
REPLAY_WINDOW = 128
_REKEY_NONCE = b"\x00\x00\x00\x00" + b"\xff" * 8


class Kind(enum.Enum):
    RESERVED = "reserved"
    PLAIN_COAP = "plain_coap"
    HANDSHAKE = "handshake"
    RECORD = "record"


def classify(first_byte: int) -> Kind:
    top = first_byte >> 6
    if top == 0b11:
        return Kind.RECORD
    if top == 0b10:
        return Kind.HANDSHAKE
    if top == 0b01:
        return Kind.PLAIN_COAP
    return Kind.RESERVED


@attrs.frozen
class RecordHeader:
    key_phase: int
    control: bool
    echo: int
    sid: int
    truncated_pn: int
    pn_len: int
    raw: bytes  # the exact header bytes (AAD)


def parse_header(data: bytes) -> RecordHeader | None:
    """Parse the header of a transport record, or None if it is malformed."""
    if len(data) < MIN_HEADER + TAG_LEN:
        return None
    b0 = data[0]
    if b0 >> 6 != 0b11 or b0 & RESERVED_MASK:
        return None
    ll = (b0 & PN_LEN_MASK) >> 2
    if ll == 3:
        return None
    pn_len = ll + 1
    hlen = 1 + SID_LEN + pn_len
    if len(data) < hlen + TAG_LEN:
        return None
    return RecordHeader(
        key_phase=1 if b0 & FLAG_KEY_PHASE else 0,
        echo=1 if b0 & FLAG_ECHO else 0,
        control=bool(b0 & FLAG_CONTROL),
        sid=int.from_bytes(data[1:3], "big"),
        truncated_pn=int.from_bytes(data[3:hlen], "big"),
        pn_len=pn_len,
        raw=bytes(data[:hlen]),
    )


def build_header(
    *, key_phase: int, control: bool, sid: int, pn: int, pn_len: int, echo: int = 0
) -> bytes:
    if pn_len not in (1, 2, 3):
        raise ValueError("pn_len must be 1..3")
    b0 = RECORD_FLAG | ((pn_len - 1) << 2)
    if key_phase & 1:
        b0 |= FLAG_KEY_PHASE
    if control:
        b0 |= FLAG_CONTROL
    if echo & 1:
        b0 |= FLAG_ECHO
    mask = (1 << (8 * pn_len)) - 1
    return bytes([b0]) + sid.to_bytes(SID_LEN, "big") + (pn & mask).to_bytes(pn_len, "big")


def expand_pn(largest: int, truncated: int, pn_len: int) -> int:
    """Recover the full packet number nearest to ``largest + 1`` (RFC 9000 A.3)."""
    bits = 8 * pn_len
    expected = largest + 1
    win = 1 << bits
    hwin = win // 2
    mask = win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def nonce(pn: int) -> bytes:
    return b"\x00\x00\x00\x00" + pn.to_bytes(8, "little")


class Aead(Protocol):
    """ChaCha20-Poly1305 under one key: cryptography's ``ChaCha20Poly1305`` or
    :class:`SodiumAead` (``decrypt`` raises ``InvalidTag`` for a forgery)."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


class SodiumAead:
    """ChaCha20-Poly1305 under ``key`` through libsodium (``noise/_caead.c``, the native
    build): what cryptography's ``ChaCha20Poly1305(key)`` gives, byte for byte, without
    its binding's per-call OpenSSL context; :meth:`open` says None for a forgery."""

    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("ChaCha20Poly1305 key must be 32 bytes.")
        self.key = key

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        out: bytes = _CAEAD.seal(self.key, nonce, data, associated_data or b"")
        return out

    def open(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes | None:
        out: bytes | None = _CAEAD.open(self.key, nonce, data, associated_data or b"")
        return out

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        out = self.open(nonce, data, associated_data)
        if out is None:
            raise InvalidTag
        return out


def make_aead(key: bytes) -> Aead:
    """ChaCha20-Poly1305 under ``key``: libsodium's where the native build has it."""
    if _CAEAD is not None:
        return SodiumAead(key)
    return ChaCha20Poly1305(key)


#: AEAD objects of the keys used most recently, at most :data:`AEAD_CACHE_SIZE`
#: (oldest dropped first): making one of cryptography's costs about as much as the
#: encryption of a small record, and a busy session uses the same key for every record.
#: Bounded, so a listener with thousands of sessions keeps no OpenSSL context (about
#: 2 KB) per session; keys replaced by a rekey are dropped at once (:func:`forget_aead`).
_AEADS: dict[bytes, Aead] = {}
AEAD_CACHE_SIZE = 64


def aead_for(key: bytes) -> Aead:
    """The ChaCha20-Poly1305 AEAD object for ``key`` (from the bounded cache)."""
    aead = _AEADS.get(key)
    if aead is None:
        aead = make_aead(key)
        if len(_AEADS) >= AEAD_CACHE_SIZE:
            try:
                del _AEADS[next(iter(_AEADS))]
            except (KeyError, RuntimeError, StopIteration):  # (another thread's change)
                pass
        _AEADS[key] = aead
    return aead


def cached_aead(key: bytes) -> bool:
    """Whether ``key``'s AEAD object is in the cache (tests, debugging)."""
    return key in _AEADS


def aead_cache_len() -> int:
    """How many AEAD objects the cache holds."""
    return len(_AEADS)


def forget_aead(key: bytes | None) -> None:
    """Drop ``key``'s AEAD object from the cache (a key that will not be used again)."""
    if key is not None:
        _AEADS.pop(key, None)


def forget_keys(send: SendKeys | None, recv: RecvKeys | None) -> None:
    """Drop the cached AEAD objects of a session that ends (its keys are not used again)."""
    if send is not None:
        forget_aead(send.key)
    if recv is not None:
        forget_aead(recv.key)
        forget_aead(recv.previous)


def rekey(key: bytes) -> bytes:
    """Noise REKEY: the first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zero bytes)."""
    return ChaCha20Poly1305(key).encrypt(_REKEY_NONCE, b"\x00" * 32, b"")[:32]


class ReplayWindow:
    """Sliding window of REPLAY_WINDOW packet numbers below the highest seen."""

    __slots__ = ("bits", "highest")

    def __init__(self) -> None:
        self.highest = -1
        self.bits = 0  # bit i set = packet number (highest - i) received

    def fresh(self, pn: int) -> bool:
        """True if ``pn`` was not seen yet and is not too old to tell."""
        if pn > self.highest:
            return True
        offset = self.highest - pn
        if offset >= REPLAY_WINDOW:
            return False
        return not (self.bits >> offset) & 1

    def too_old(self, pn: int) -> bool:
        return pn <= self.highest - REPLAY_WINDOW

    def mark(self, pn: int) -> None:
        if pn > self.highest:
            shift = pn - self.highest
            self.bits = ((self.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = pn
        else:
            self.bits |= 1 << (self.highest - pn)

    def snapshot(self) -> tuple[int, int]:
        return (self.highest, self.bits)


class SendKeys:
    """Outbound direction: current key, key generation and next packet number.

    The AEAD object is not kept per session (an OpenSSL ChaCha20-Poly1305 context is
    about 2 KB, and a listener holds thousands of sessions): it comes from the small
    cache of recently used keys (:func:`aead_for`)."""

    __slots__ = ("generation", "generation_first_pn", "generation_started", "key", "next_pn")

    def __init__(self, key: bytes, now: float) -> None:
        self.key = key
        self.generation = 0
        self.next_pn = 0
        self.generation_started = now
        self.generation_first_pn = 0

    @property
    def aead(self) -> Aead:
        return aead_for(self.key)

    def update(self, now: float) -> None:
        forget_aead(self.key)
        self.key = rekey(self.key)
        self.generation += 1
        self.generation_started = now
        self.generation_first_pn = self.next_pn

    def packets_in_generation(self) -> int:
        return self.next_pn - self.generation_first_pn


class RecvKeys:
    """Inbound direction: current generation, the previous one (briefly), the next on demand.

    Keys are kept, AEAD objects taken from the cache (see :class:`SendKeys`)."""

    __slots__ = ("first_pn", "generation", "key", "previous", "previous_expires")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.generation = 0
        self.first_pn: int | None = None  # lowest packet number seen in this generation
        self.previous: bytes | None = None  # the previous generation's key, briefly
        self.previous_expires = 0.0

    @property
    def aead(self) -> Aead:
        return aead_for(self.key)

    def select(self, phase: int, pn: int, now: float) -> tuple[Aead, int, bytes | None]:
        """The AEAD for a record: (aead, generation, new key if it is the next generation)."""
        if phase == self.generation & 1:
            return aead_for(self.key), self.generation, None
        if (
            self.first_pn is not None
            and pn < self.first_pn
            and self.previous is not None
            and now < self.previous_expires
        ):
            return make_aead(self.previous), self.generation - 1, None
        if (
            self.first_pn is None
            and self.generation > 0
            and self.previous is not None
            and now < self.previous_expires
        ):
            # Nothing seen in the current generation yet: an old-phase record.
            return make_aead(self.previous), self.generation - 1, None
        nxt = rekey(self.key)
        return make_aead(nxt), self.generation + 1, nxt

    def commit(
        self, generation: int, new_key: bytes | None, pn: int, now: float, keep: float
    ) -> None:
        """Record a successfully opened record (may advance the generation)."""
        if new_key is not None and generation == self.generation + 1:
            forget_aead(self.previous)
            self.previous = self.key
            self.previous_expires = now + keep
            self.key = new_key
            self.generation = generation
            self.first_pn = pn
            return
        if generation == self.generation and (self.first_pn is None or pn < self.first_pn):
            self.first_pn = pn

    def expire(self, now: float) -> None:
        if self.previous is not None and now >= self.previous_expires:
            forget_aead(self.previous)
            self.previous = None

    def snapshot(self) -> tuple[int, int | None, bool]:
        return (self.generation, self.first_pn, self.previous is not None)


def open_record(aead: Aead, pn: int, header: bytes, body: bytes) -> bytes | None:
    if isinstance(aead, SodiumAead):
        return aead.open(nonce(pn), body, header)
    try:
        return aead.decrypt(nonce(pn), body, header)
    except InvalidTag:
        return None
