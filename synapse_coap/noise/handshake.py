"""Handshakes: the state machine, the payload format and the noiseprotocol driver.

noiseprotocol 0.3.1 runs the handshake only. After the final message we take
the two split keys and the handshake hash; records are then sealed by
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
from collections.abc import Sequence

import attrs
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import Keypair, NoiseConnection

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


@attrs.frozen
class SplitResult:
    send_key: bytes
    recv_key: bytes
    handshake_hash: bytes
    remote_static: bytes


class Driver:
    """One side of one Noise handshake, made retry-safe.

    noiseprotocol mutates its state even when reading a message fails, and
    deletes it after split(). This driver keeps the transcript (our ephemeral
    private key and every message) and rebuilds a fresh NoiseConnection for
    each operation, so a forged or corrupted message never changes state:
    ``read`` returns a *new* Driver on success and raises HandshakeError
    otherwise, leaving ``self`` untouched.
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
        if pattern not in ("IK", "XX"):
            raise LocalProtocolError(f"unsupported handshake pattern {pattern!r}")
        self.pattern = pattern
        self.initiator = initiator
        self.static_private = static_private
        self.remote_static = remote_static
        self.ephemeral_private = ephemeral_private
        self.prologue = prologue
        self.transcript = transcript
        self.split: SplitResult | None = None

    @property
    def protocol_name(self) -> bytes:
        return IK_NAME if self.pattern == "IK" else XX_NAME

    def _replay(self) -> tuple[NoiseConnection, object]:
        conn = NoiseConnection.from_name(self.protocol_name)
        conn.set_prologue(self.prologue)
        if self.initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, self.static_private)
        if self.remote_static is not None and self.initiator and self.pattern == "IK":
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, self.remote_static)
        conn.start_handshake()
        hs = conn.noise_protocol.handshake_state
        hs.e = KeyPair25519.from_private_bytes(self.ephemeral_private)
        for op, data in self.transcript:
            if op == "w":
                conn.write_message(data)
            else:
                conn.read_message(data)
        return conn, hs

    def _finish(self, conn: NoiseConnection, hs: object) -> SplitResult:
        proto = conn.noise_protocol
        rs = getattr(hs, "rs", None)
        remote = getattr(rs, "public_bytes", None)
        if not isinstance(remote, bytes):
            raise HandshakeError("handshake finished without a remote static key")
        return SplitResult(
            send_key=bytes(proto.cipher_state_encrypt.k),
            recv_key=bytes(proto.cipher_state_decrypt.k),
            handshake_hash=bytes(conn.get_handshake_hash()),
            remote_static=remote,
        )

    def write(self, payload: bytes) -> tuple[Driver, bytes]:
        """Write the next message. Returns (new driver, noise message bytes)."""
        try:
            conn, hs = self._replay()
            message = bytes(conn.write_message(payload))
        except Exception as exc:  # noiseprotocol raises assorted exception types
            raise LocalProtocolError(f"handshake write failed: {exc!r}") from None
        new = self._next(("w", payload))
        if conn.handshake_finished:
            new.split = self._finish(conn, hs)
        return new, message

    def read(self, message: bytes) -> tuple[Driver, bytes]:
        """Read the peer's next message. Returns (new driver, payload)."""
        try:
            conn, hs = self._replay()
            payload = bytes(conn.read_message(message))
        except Exception as exc:  # forged, corrupted or low-order input
            raise HandshakeError(f"handshake message rejected: {type(exc).__name__}") from None
        new = self._next(("r", bytes(message)))
        if conn.handshake_finished:
            new.split = self._finish(conn, hs)
        elif self.remote_static is None:
            rs = getattr(hs, "rs", None)
            remote = getattr(rs, "public_bytes", None)
            if isinstance(remote, bytes):
                new.remote_static = remote
        return new, payload

    def _next(self, step: tuple[str, bytes]) -> Driver:
        return Driver(
            pattern=self.pattern,
            initiator=self.initiator,
            static_private=self.static_private,
            remote_static=self.remote_static,
            ephemeral_private=self.ephemeral_private,
            prologue=self.prologue,
            transcript=(*self.transcript, step),
        )

    def peer_static_seen(self) -> bytes | None:
        """The peer's static key once a message carrying it has been read."""
        if self.split is not None:
            return self.split.remote_static
        return self.remote_static
