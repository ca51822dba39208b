"""Handshakes: the state machine, the payload format and the Noise handshake itself.

:class:`Driver` is a small implementation of the Noise Protocol Framework's
handshake (revision 34) for exactly the two protocols used here,
``Noise_IK_25519_ChaChaPoly_BLAKE2s`` and ``Noise_XX_25519_ChaChaPoly_BLAKE2s``,
over ``cryptography``; it is checked against the cacophony and snow test
vectors and against noiseprotocol 0.3.1 (tests/unit/test_noise_vectors.py,
test_noise_differential.py). After the final message we take the two split
keys and the handshake hash; records are then sealed by
:mod:`synapse_coap.noise.records` with explicit nonces.

Handshake datagrams (byte 0 = ``0x80 | type``)::

    IK1  0x81  initiator sid(2) || e(32) || enc s(48) || enc payload(+16)
    IK2  0x82  dest sid(2) || responder sid(2) || e(32) || enc payload(+16)
    XX1  0x83  initiator sid(2) || e(32) || payload (cleartext: profile offers only)
    XX2  0x84  dest sid(2) || responder sid(2) || e(32) || enc s(48) || enc payload(+16)
    XX3  0x85  dest sid(2) || enc s(48) || enc payload(+16)

The sids are the *sender's* chosen receive session id (and, in replies, the
id of the session they answer). Payloads are a tiny TLV list, see
:class:`Payload`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
from collections.abc import Sequence

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from synapse_coap.errors import HandshakeError, LocalProtocolError

PROLOGUE = b"synapse-coap/1"
IK_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
XX_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"
HASH_PREFIX_LEN = 8


class MsgType(enum.IntEnum):
    IK1 = 0x81
    IK2 = 0x82
    XX1 = 0x83
    XX2 = 0x84
    XX3 = 0x85


#: Bytes of each handshake datagram before its payload (noise overhead included).
FIXED_LEN = {
    MsgType.IK1: 1 + 2 + 32 + 48 + 16,
    MsgType.IK2: 1 + 4 + 32 + 16,
    MsgType.XX1: 1 + 2 + 32,
    MsgType.XX2: 1 + 4 + 32 + 48 + 16,
    MsgType.XX3: 1 + 2 + 48 + 16,
}
#: Header bytes (type and sids) before the Noise message.
HEADER_LEN = {
    MsgType.IK1: 3,
    MsgType.IK2: 5,
    MsgType.XX1: 3,
    MsgType.XX2: 5,
    MsgType.XX3: 3,
}


class State(enum.Enum):
    """Handshake progress of one session."""

    START = "start"
    IK_SENT_1 = "ik-sent-1"  # initiator: waiting for IK2
    XX_SENT_1 = "xx-sent-1"  # initiator: waiting for XX2
    XX_SENT_3 = "xx-sent-3"  # initiator: keys ready, XX3 unconfirmed
    IK_RECEIVED_1 = "ik-received-1"  # responder: keys ready, IK2 (maybe) unconfirmed
    XX_RECEIVED_1 = "xx-received-1"  # responder: XX2 sent, waiting for XX3
    ESTABLISHED = "established"  # both sides proved to have the keys
    FAILED = "failed"


class Input(enum.Enum):
    SEND_IK1 = "send-ik1"
    SEND_XX1 = "send-xx1"
    RECV_IK1 = "recv-ik1"
    RECV_XX1 = "recv-xx1"
    RECV_IK2 = "recv-ik2"
    RECV_XX2 = "recv-xx2"  # and send XX3
    RECV_XX3 = "recv-xx3"
    RECV_RECORD = "recv-record"  # an authentic transport record
    TIMEOUT = "timeout"
    REFUSED = "refused"  # trust check or payload failure


#: The whole state machine. Anything not listed is a LocalProtocolError.
TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.START, Input.SEND_IK1): State.IK_SENT_1,
    (State.START, Input.SEND_XX1): State.XX_SENT_1,
    (State.START, Input.RECV_IK1): State.IK_RECEIVED_1,
    (State.START, Input.RECV_XX1): State.XX_RECEIVED_1,
    (State.IK_SENT_1, Input.RECV_IK2): State.ESTABLISHED,
    (State.IK_SENT_1, Input.TIMEOUT): State.FAILED,
    (State.IK_SENT_1, Input.REFUSED): State.FAILED,
    (State.XX_SENT_1, Input.RECV_XX2): State.XX_SENT_3,
    (State.XX_SENT_1, Input.TIMEOUT): State.FAILED,
    (State.XX_SENT_1, Input.REFUSED): State.FAILED,
    (State.XX_SENT_3, Input.RECV_RECORD): State.ESTABLISHED,
    (State.XX_SENT_3, Input.TIMEOUT): State.FAILED,
    (State.IK_RECEIVED_1, Input.RECV_RECORD): State.ESTABLISHED,
    (State.IK_RECEIVED_1, Input.TIMEOUT): State.FAILED,
    (State.XX_RECEIVED_1, Input.RECV_XX3): State.ESTABLISHED,
    (State.XX_RECEIVED_1, Input.TIMEOUT): State.FAILED,
    (State.XX_RECEIVED_1, Input.REFUSED): State.FAILED,
    (State.ESTABLISHED, Input.RECV_RECORD): State.ESTABLISHED,
}

#: States in which transport keys exist.
HAS_KEYS = frozenset({State.XX_SENT_3, State.IK_RECEIVED_1, State.ESTABLISHED})


def transition(state: State, event: Input) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalProtocolError(
            f"handshake: no transition from {state.value} on {event.value}"
        ) from None


# --------------------------------------------------------------------------- payload

T_OFFERS = 1
T_SELECTED = 2
T_APP = 3
T_EARLY = 4
T_CONFIRM = 5
T_REPLACES = 6
T_TIME = 7
T_EARLY_REFUSED = 8
MAX_OFFERS = 16


def profile_tag(profile_id: int, content_hash: bytes) -> bytes:
    """9 bytes: the id and the first 8 bytes of the content hash (zero padded)."""
    return bytes([profile_id]) + content_hash[:HASH_PREFIX_LEN].ljust(HASH_PREFIX_LEN, b"\x00")


@attrs.frozen
class Payload:
    """What rides inside handshake messages (TLV: type(1) length(1 or 2) value).

    Length: one byte below 0x80, else two bytes big endian with the top bit
    set (at most 32767). Unknown types are skipped (forward compatible).
    Profile 0 is never offered (it is always common).
    """

    offers: tuple[bytes, ...] = ()  # profile tags
    selected: bytes | None = None  # profile tag chosen by the responder
    app: bytes = b""
    early: bytes | None = None
    confirm: bool = False  # responder asks for an immediate record (queued replies)
    replaces: int | None = None  # initiator: the responder sid this session replaces
    time: int | None = None  # initiator: its wall clock (s, mod 2^32) when early data rides
    early_refused: bool = False  # responder: the early data was not accepted: send it again

    def encode(self) -> bytes:
        out = bytearray()

        def tlv(kind: int, value: bytes) -> None:
            n = len(value)
            if n > 0x7FFF:
                raise LocalProtocolError("handshake payload item longer than 32767 bytes")
            out.append(kind)
            if n < 0x80:
                out.append(n)
            else:
                out.extend((0x8000 | n).to_bytes(2, "big"))
            out.extend(value)

        if self.offers:
            tlv(T_OFFERS, b"".join(self.offers))
        if self.selected is not None:
            tlv(T_SELECTED, self.selected)
        if self.app:
            tlv(T_APP, self.app)
        if self.early is not None:
            tlv(T_EARLY, self.early)
        if self.confirm:
            tlv(T_CONFIRM, b"")
        if self.replaces is not None:
            tlv(T_REPLACES, self.replaces.to_bytes(2, "big"))
        if self.time is not None:
            tlv(T_TIME, (self.time & 0xFFFFFFFF).to_bytes(4, "big"))
        if self.early_refused:
            tlv(T_EARLY_REFUSED, b"")
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        offers: tuple[bytes, ...] = ()
        selected: bytes | None = None
        app = b""
        early: bytes | None = None
        confirm = False
        replaces: int | None = None
        when: int | None = None
        early_refused = False
        seen: set[int] = set()
        i = 0
        n = len(data)
        while i < n:
            kind = data[i]
            if i + 1 >= n:
                raise HandshakeError("handshake payload: truncated length")
            length = data[i + 1]
            i += 2
            if length & 0x80:
                if i >= n:
                    raise HandshakeError("handshake payload: truncated length")
                length = ((length & 0x7F) << 8) | data[i]
                i += 1
            if i + length > n:
                raise HandshakeError("handshake payload: item overruns the message")
            value = bytes(data[i : i + length])
            i += length
            if kind in seen:
                raise HandshakeError(f"handshake payload: duplicate item {kind}")
            seen.add(kind)
            if kind == T_OFFERS:
                if length % 9 or length // 9 > MAX_OFFERS:
                    raise HandshakeError("handshake payload: bad profile offers")
                offers = tuple(value[j : j + 9] for j in range(0, length, 9))
            elif kind == T_SELECTED:
                if length != 9:
                    raise HandshakeError("handshake payload: bad selected profile")
                selected = value
            elif kind == T_APP:
                app = value
            elif kind == T_EARLY:
                early = value
            elif kind == T_CONFIRM:
                confirm = True
            elif kind == T_REPLACES:
                if length != 2:
                    raise HandshakeError("handshake payload: bad replaced session id")
                replaces = int.from_bytes(value, "big")
            elif kind == T_TIME:
                if length != 4:
                    raise HandshakeError("handshake payload: bad time")
                when = int.from_bytes(value, "big")
            elif kind == T_EARLY_REFUSED:
                early_refused = True
        return cls(
            offers=offers,
            selected=selected,
            app=app,
            early=early,
            confirm=confirm,
            replaces=replaces,
            time=when,
            early_refused=early_refused,
        )


def negotiate(offers: Sequence[bytes], ours: Sequence[bytes]) -> bytes | None:
    """The highest profile tag both sides offer (by id, then hash), or None (= profile 0)."""
    common = set(offers) & set(ours)
    if not common:
        return None
    return max(common)


# --------------------------------------------------------------------------- driver

#: The two handshake patterns, as the Noise spec writes them (section 7):
#: IK's pre-message ``<- s`` and the tokens of each message, in order.
PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "IK": (("e", "es", "s", "ss"), ("e", "ee", "se")),
    "XX": (("e",), ("e", "ee", "s", "es"), ("s", "se")),
}
#: Noise's limit on one handshake message (section 3).
MAX_MESSAGE_LEN = 65535
_DHLEN = 32
_TAGLEN = 16


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """HKDF with two outputs (Noise spec section 4.3), over HMAC-BLAKE2s."""
    temp = _hmac(chaining_key, ikm)
    out1 = _hmac(temp, b"\x01")
    return out1, _hmac(temp, out1 + b"\x02")


@functools.lru_cache(maxsize=16)
def _static_key(private: bytes) -> tuple[X25519PrivateKey, bytes]:
    """A static key loaded once (loading derives the public key: one X25519 operation)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key, key.public_key().public_bytes_raw()


def _load(private: bytes) -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.from_private_bytes(private)
    return key, key.public_key().public_bytes_raw()


def _dh(key: X25519PrivateKey, public: bytes) -> bytes:
    # cryptography refuses an all-zero shared secret (a low-order point) with ValueError
    return key.exchange(X25519PublicKey.from_public_bytes(public))


@attrs.frozen
class _Symmetric:
    """Noise's SymmetricState and CipherState (spec sections 5.1, 5.2), immutable.

    Every operation returns a new value, so a message that fails half way
    leaves the handshake it was read into exactly as it was.
    """

    ck: bytes
    h: bytes
    k: bytes | None = None
    n: int = 0

    @classmethod
    def initialize(cls, protocol_name: bytes, prologue: bytes) -> _Symmetric:
        if len(protocol_name) <= 32:
            h = protocol_name.ljust(32, b"\x00")
        else:
            h = hashlib.blake2s(protocol_name).digest()
        return cls(ck=h, h=h).mix_hash(prologue)

    def mix_hash(self, data: bytes) -> _Symmetric:
        return attrs.evolve(self, h=hashlib.blake2s(self.h + data).digest())

    def mix_key(self, ikm: bytes) -> _Symmetric:
        ck, k = _hkdf2(self.ck, ikm)
        return attrs.evolve(self, ck=ck, k=k, n=0)

    def _nonce(self) -> bytes:
        return b"\x00\x00\x00\x00" + self.n.to_bytes(8, "little")

    def encrypt_and_hash(self, plaintext: bytes) -> tuple[_Symmetric, bytes]:
        if self.k is None:
            return self.mix_hash(plaintext), plaintext
        sealed = ChaCha20Poly1305(self.k).encrypt(self._nonce(), plaintext, self.h)
        return attrs.evolve(self, n=self.n + 1).mix_hash(sealed), sealed

    def decrypt_and_hash(self, data: bytes) -> tuple[_Symmetric, bytes]:
        if self.k is None:
            return self.mix_hash(data), data
        opened = ChaCha20Poly1305(self.k).decrypt(self._nonce(), data, self.h)
        return attrs.evolve(self, n=self.n + 1).mix_hash(data), opened

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


@attrs.frozen
class SplitResult:
    send_key: bytes
    recv_key: bytes
    handshake_hash: bytes
    remote_static: bytes


class Driver:
    """One side of one Noise handshake (IK or XX, 25519, ChaChaPoly, BLAKE2s), retry-safe.

    A small implementation of the Noise spec's HandshakeState over
    ``cryptography`` (X25519, ChaCha20-Poly1305) and ``hashlib`` (BLAKE2s).
    Its state is immutable: ``write`` and ``read`` return a *new* Driver, and
    a forged or corrupted message raises HandshakeError and leaves ``self``
    untouched, so the endpoint keeps one Driver per half-open session and
    each message costs only its own tokens' X25519 operations (IK: 3 to write
    the first message, 2 to read it; 3 to write the reply, 2 to read it; the
    static public key is derived once per key and cached).

    ``transcript`` keeps the messages read and written (for duplicate
    detection); it is never replayed.
    """

    def __init__(
        self,
        *,
        pattern: str,
        initiator: bool,
        static_private: bytes,
        remote_static: bytes | None,
        ephemeral_private: bytes,
        prologue: bytes = PROLOGUE,
        transcript: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        if pattern not in PATTERNS:
            raise LocalProtocolError(f"unsupported handshake pattern {pattern!r}")
        if transcript:
            raise LocalProtocolError("a Driver starts with an empty transcript")
        if pattern == "IK" and initiator and remote_static is None:
            raise LocalProtocolError("an IK initiator needs the responder's static key")
        self.pattern = pattern
        self.initiator = initiator
        self.static_private = static_private
        self.remote_static = remote_static
        self.ephemeral_private = ephemeral_private
        self.prologue = prologue
        self.transcript = transcript
        self.split: SplitResult | None = None
        self._remote_ephemeral: bytes | None = None
        #: our ephemeral key, loaded when first used (an X25519 operation) and kept
        self._e_key: tuple[X25519PrivateKey, bytes] | None = None
        sym = _Symmetric.initialize(self.protocol_name, prologue)
        if pattern == "IK":  # pre-message "<- s": the responder's static key
            sym = sym.mix_hash(
                remote_static if initiator and remote_static else _static_key(static_private)[1]
            )
        self._sym = sym

    @property
    def protocol_name(self) -> bytes:
        return IK_NAME if self.pattern == "IK" else XX_NAME

    def _our_turn(self) -> bool:
        return (len(self.transcript) % 2 == 0) == self.initiator

    def _tokens(self) -> tuple[str, ...]:
        messages = PATTERNS[self.pattern]
        if self.split is not None or len(self.transcript) >= len(messages):
            raise LocalProtocolError("handshake already finished")
        return messages[len(self.transcript)]

    def _ephemeral(self) -> tuple[X25519PrivateKey, bytes]:
        if self._e_key is None:
            return _load(self.ephemeral_private)
        return self._e_key

    def _mix_dh(
        self,
        sym: _Symmetric,
        token: str,
        e_key: tuple[X25519PrivateKey, bytes] | None,
        re: bytes | None,
        rs: bytes | None,
    ) -> tuple[_Symmetric, tuple[X25519PrivateKey, bytes] | None]:
        # the local key of each side of a DH token (spec section 5.3)
        ours, theirs = token[0], token[1]
        if not self.initiator:
            ours, theirs = theirs, ours
        if ours == "e":
            e_key = e_key or self._ephemeral()
            local = e_key[0]
        else:
            local = _static_key(self.static_private)[0]
        remote = re if theirs == "e" else rs
        if remote is None:
            raise LocalProtocolError(f"handshake token {token!r} before the remote key")
        return sym.mix_key(_dh(local, remote)), e_key

    def _next(
        self,
        op: str,
        data: bytes,
        sym: _Symmetric,
        e_key: tuple[X25519PrivateKey, bytes] | None,
        re: bytes | None,
        rs: bytes | None,
    ) -> Driver:
        new = object.__new__(Driver)
        new.__dict__.update(self.__dict__)
        new.transcript = (*self.transcript, (op, data))
        new._sym = sym
        new._e_key = e_key
        new._remote_ephemeral = re
        new.remote_static = rs
        if len(new.transcript) == len(PATTERNS[self.pattern]):
            if rs is None:  # pragma: no cover - both patterns transmit or pre-share s
                raise HandshakeError("handshake finished without a remote static key")
            k1, k2 = sym.split()
            send, recv = (k1, k2) if self.initiator else (k2, k1)
            new.split = SplitResult(
                send_key=send, recv_key=recv, handshake_hash=sym.h, remote_static=rs
            )
        return new

    def write(self, payload: bytes) -> tuple[Driver, bytes]:
        """Write the next message. Returns (new driver, noise message bytes)."""
        tokens = self._tokens()
        if not self._our_turn():
            raise LocalProtocolError("handshake write out of turn")
        sym, re, rs = self._sym, self._remote_ephemeral, self.remote_static
        e_key = self._e_key
        out = bytearray()
        try:
            for token in tokens:
                if token == "e":
                    e_key = e_key or self._ephemeral()
                    out += e_key[1]
                    sym = sym.mix_hash(e_key[1])
                elif token == "s":
                    sym, sealed = sym.encrypt_and_hash(_static_key(self.static_private)[1])
                    out += sealed
                else:
                    sym, e_key = self._mix_dh(sym, token, e_key, re, rs)
            sym, sealed = sym.encrypt_and_hash(payload)
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError(f"handshake write failed: {exc!r}") from None
        out += sealed
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalProtocolError("handshake message longer than 65535 bytes")
        return self._next("w", payload, sym, e_key, re, rs), bytes(out)

    def read(self, message: bytes) -> tuple[Driver, bytes]:
        """Read the peer's next message. Returns (new driver, payload)."""
        tokens = self._tokens()
        if self._our_turn():
            raise LocalProtocolError("handshake read out of turn")
        message = bytes(message)
        if len(message) > MAX_MESSAGE_LEN:
            raise HandshakeError("handshake message rejected: too long")
        sym, re, rs = self._sym, self._remote_ephemeral, self.remote_static
        e_key = self._e_key
        i = 0
        try:
            for token in tokens:
                if token == "e":
                    if len(message) - i < _DHLEN:
                        raise ValueError("truncated")
                    re = message[i : i + _DHLEN]
                    i += _DHLEN
                    sym = sym.mix_hash(re)
                elif token == "s":
                    n = _DHLEN + (_TAGLEN if sym.k is not None else 0)
                    if len(message) - i < n:
                        raise ValueError("truncated")
                    sym, rs = sym.decrypt_and_hash(message[i : i + n])
                    i += n
                else:
                    sym, e_key = self._mix_dh(sym, token, e_key, re, rs)
            if sym.k is not None and len(message) - i < _TAGLEN:
                raise ValueError("truncated")
            sym, payload = sym.decrypt_and_hash(message[i:])
        except (ValueError, InvalidTag) as exc:  # forged, corrupted, truncated or low-order
            raise HandshakeError(f"handshake message rejected: {type(exc).__name__}") from None
        return self._next("r", message, sym, e_key, re, rs), payload

    def peer_static_seen(self) -> bytes | None:
        """The peer's static key once a message carrying it has been read."""
        if self.split is not None:
            return self.split.remote_static
        return self.remote_static
