"""Push notifications relative to an earlier one (wire/push_base.py, body marker 0xfe):
exact or refused under loss, duplication, re-sends after a park and re-registration."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.messages import CoapMessage, HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import ReceiverTokens, SenderTokens
from synapse_coap.wire.body import MARKER_DEFLATE_BASE, decode_body, encode_body
from synapse_coap.wire.body_decode import body_cbor
from synapse_coap.wire.body_tables import DEFAULT_BODY_LIMITS
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile
from synapse_coap.wire.push_base import (
    BASE_MAX,
    KEPT,
    OBSERVE_MODULUS,
    Base,
    ClientBases,
    Kept,
    ServerBase,
    UnknownBase,
)
from synapse_coap.wire.strings import ReceiverStrings, SenderStrings, UnknownStringReference

CORPUS = Path(__file__).parents[1] / "corpus" / "heldout" / "client.jsonl"
CTX = WireContext(("corpus.example.org",))
JSON = (("content-type", "application/json"),)


@pytest.fixture(scope="module")
def codec() -> WireCodec:
    return WireCodec(load_profile(1), CTX)


def _id(sigil: str, seed: int) -> str:
    raw = random.Random(seed).randbytes(32)
    return sigil + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _token(k: int) -> str:
    return f"s{k}_4_2_3_3_1_1_4_0_1_1_1_1_1"


def _sync(k: int, room: str, text: str, sender: str = "@bob:corpus.example.org") -> bytes:
    """A notification carrying one new message, as Synapse 1.163 writes it for nio."""
    body = {
        "next_batch": _token(k + 1),
        "device_one_time_keys_count": {"signed_curve25519": 0},
        "device_unused_fallback_key_types": [],
        "rooms": {
            "join": {
                room: {
                    "timeline": {
                        "events": [
                            {
                                "content": {"body": text, "msgtype": "m.text"},
                                "event_id": _id("$", 1000 + k),
                                "origin_server_ts": 1795324416188 + 1000 * k,
                                "sender": sender,
                                "type": "m.room.message",
                                "unsigned": {"age": 40 + k, "membership": "join"},
                            }
                        ],
                        "prev_batch": _token(k),
                        "limited": False,
                    },
                    "state": {"events": []},
                    "account_data": {"events": []},
                    "ephemeral": {"events": []},
                    "unread_notifications": {"notification_count": k, "highlight_count": 0},
                    "summary": {},
                }
            }
        },
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


ROOM = _id("!", 1)


def _corpus_pair() -> tuple[bytes, bytes]:
    entries = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    bodies = [
        json.dumps(e["response"]["body"], separators=(",", ":"), ensure_ascii=False).encode()
        for e in entries
        if e["name"] == "sync.incremental"
    ]
    return bodies[0], bodies[1]


# --- the body codec -------------------------------------------------------------------


def test_a_body_relative_to_a_base_round_trips_and_names_its_distance() -> None:
    profile = load_profile(1)
    base_value = json.loads(_sync(1, ROOM, "hello there"))
    value = json.loads(_sync(2, ROOM, "and again"))
    base_cbor = body_cbor(encode_body(base_value, profile, CTX), profile)
    assert base_cbor[0] != MARKER_DEFLATE_BASE
    plain = encode_body(value, profile, CTX)
    relative = encode_body(value, profile, CTX, base=(3, base_cbor))
    assert relative[0] == MARKER_DEFLATE_BASE and relative[1] == 3
    assert len(relative) <= len(plain) - 40
    assert decode_body(relative, profile, CTX, base=lambda d: base_cbor) == value
    with pytest.raises(RemoteProtocolError):
        decode_body(relative, profile, CTX)  # outside a notification: refused
    with pytest.raises(UnknownBase):
        decode_body(relative, profile, CTX, base=ClientBases().view(9))
    # another base's bytes never decode as if they were the right one
    other = body_cbor(encode_body(json.loads(_sync(7, _id("!", 2), "x")), profile, CTX), profile)
    with pytest.raises(RemoteProtocolError):
        assert decode_body(relative, profile, CTX, base=lambda d: other) == value


def test_without_a_base_the_encoding_is_unchanged() -> None:
    profile = load_profile(1)
    value = json.loads(_sync(2, ROOM, "and again"))
    assert encode_body(value, profile, CTX) == encode_body(value, profile, CTX, base=None)


@pytest.mark.parametrize("head", [b"\xfe", b"\xfe\x18\x03", b"\xfe\x61", b"\xfe\x20"])
def test_a_bad_base_distance_is_refused(head: bytes) -> None:
    profile = load_profile(1)
    with pytest.raises(RemoteProtocolError):
        decode_body(head + b"\x03\x00", profile, CTX, base=lambda d: b"")


# --- the codec: the corpus notification ------------------------------------------------


def _server_notify(
    codec: WireCodec, server: ServerBase, seq: int, body: bytes, table: Any = None
) -> tuple[CoapMessage, Kept]:
    base = server.for_notification(seq)
    msg = codec.encode_response(HttpResponse(200, JSON, body), references=table, base=base)
    return msg, codec.notification_kept(msg, base)


def _client_decode(
    codec: WireCodec, client: ClientBases, seq: int, msg: CoapMessage, strings: Any = None
) -> bytes:
    view = client.view(seq)
    got = codec.decode_response(msg, strings=strings, bases=view).body
    view.commit()
    return got


def test_the_corpus_notification_relative_to_the_previous_one(codec: WireCodec) -> None:
    """sync.incremental of the held-out corpus (one new message, 697 B of JSON): 155 B
    alone, under 90 B relative to the notification before it, Content-Format left out."""
    first, second = _corpus_pair()
    server, client = ServerBase(), ClientBases()
    m1, cbor1 = _server_notify(codec, server, 1, first)
    assert _client_decode(codec, client, 1, m1) == first
    server.delivered(1, cbor1)
    alone = codec.encode_response(HttpResponse(200, JSON, second))
    m2, _ = _server_notify(codec, server, 2, second)
    assert m2.payload[0] == MARKER_DEFLATE_BASE
    assert m2.first(n.CONTENT_FORMAT) is None
    assert len(alone.payload) >= 150 and len(m2.payload) <= 90
    assert _client_decode(codec, client, 2, m2) == second


def test_client_and_server_agree_on_the_cbor_kept(codec: WireCodec) -> None:
    server, client = ServerBase(), ClientBases()
    for seq in range(1, 8):
        msg, kept = _server_notify(codec, server, seq, _sync(seq, ROOM, f"message {seq} here"))
        view = client.view(seq)
        codec.decode_response(msg, bases=view)
        view.commit()
        assert view.kept == kept
        server.delivered(seq, kept)


def test_large_notifications_are_no_base() -> None:
    server = ServerBase()
    server.delivered(4, Kept(b"\x00" * (BASE_MAX + 1)))
    assert server.for_notification(5) is None
    server.delivered(4, Kept(None, 7))
    assert server.for_notification(5) is None
    server.delivered(OBSERVE_MODULUS - 1, Kept(b"\xa0", 7))
    assert server.for_notification(2) == Base(3, b"\xa0", 7)  # Observe numbers wrap


def test_a_notification_relative_to_a_base_also_references_the_string_table(
    codec: WireCodec,
) -> None:
    """With the room in the string table and a base naming it too, the smaller wins;
    the body decodes exactly with both."""
    sender = SenderTokens(strings=SenderStrings(first_seq=40))
    receiver = ReceiverTokens(strings=ReceiverStrings())

    send = HttpRequest(
        "PUT",
        f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1".encode(),
        JSON,
        b'{"msgtype":"m.text","body":"hi"}',
    )
    codec.decode_request(codec.encode_request(send, sender), receiver)
    server, client = ServerBase(), ClientBases()
    sizes = []
    for seq in (1, 2, 3):
        body = _sync(seq, ROOM, f"text number {seq}")
        msg, kept = _server_notify(codec, server, seq, body, receiver.strings)
        assert kept.string_seq == 40  # explicit, then inherited from the base
        # the first names its String-Seq; the next ones resolve against their base's
        assert (msg.first(n.OPT_STRING_SEQ) is None) == (seq > 1)
        sizes.append(len(msg.payload))
        assert _client_decode(codec, client, seq, msg, sender.strings) == body
        server.delivered(seq, kept)
    # the client sends again: the highest number moves, the option comes back
    codec.decode_request(codec.encode_request(send, sender), receiver)
    body = _sync(4, ROOM, "text number 4")
    msg, kept = _server_notify(codec, server, 4, body, receiver.strings)
    assert msg.first(n.OPT_STRING_SEQ) == bytes((41,))
    assert kept.string_seq == 41
    assert _client_decode(codec, client, 4, msg, sender.strings) == body
    # without the client's table, or with a base that had no String-Seq: refused
    server.delivered(4, kept)
    msg, _ = _server_notify(codec, server, 5, _sync(5, ROOM, "five"), receiver.strings)
    assert msg.first(n.OPT_STRING_SEQ) is None
    with pytest.raises(UnknownStringReference):
        codec.decode_response(msg, bases=client.view(5))
    stranger = ClientBases()
    stranger._decoded(4, Kept(kept.cbor, None), None)
    with pytest.raises(UnknownStringReference):
        codec.decode_response(msg, strings=sender.strings, bases=stranger.view(5))


# --- the property: loss, duplication, re-sends, re-registration ------------------------


class _Link:
    """One registration: the server's notifications and the client's decoding; with a
    template when the registration has a ``since``."""

    def __init__(self, codec: WireCodec, since: str | None = None) -> None:
        target = b"/_matrix/client/v3/sync?filter=0&timeout=30000"
        if since is not None:
            target += b"&since=" + since.encode()
        self.server = ServerBase(codec.notification_template(target))
        self.client = ClientBases(codec.notification_template(target))
        self.seq = random.Random(0).randrange(OBSERVE_MODULUS)  # any start, wraps
        self.sent: list[tuple[int, CoapMessage, bytes]] = []


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_property_every_decode_is_exact_or_refused(codec: WireCodec, data: st.DataObject) -> None:
    """Notifications lost, ACKs lost (re-sent with the next number), late duplicates,
    registrations made again, the client writing to rooms (the string table's highest
    number moves) and new Noise sessions: a notification received in order always
    decodes, exactly; any other decodes exactly or is refused."""
    rooms = [_id("!", 10 + i) for i in range(3)]
    sender = SenderTokens(strings=SenderStrings(first_seq=data.draw(st.integers(0, 1000))))
    receiver = ReceiverTokens(strings=ReceiverStrings())
    sinces = st.none() | st.integers(0, 60).map(_token)
    link = _Link(codec, data.draw(sinces))
    pending: bytes | None = None
    k = 0
    resends = 0
    for _ in range(data.draw(st.integers(5, 40))):
        op = data.draw(
            st.sampled_from(
                ["send", "send", "send", "duplicate", "reregister", "large", "write", "session"]
            )
        )
        if op == "reregister":
            # the sidecar registers again from its last position: a new request (a new
            # CoAP token), so neither end keeps anything of the old registration
            link = _Link(codec, data.draw(sinces))
            continue
        if op == "session":
            # a new Noise session: empty string tables, and registrations made again
            sender, receiver = sender.renewed(), ReceiverTokens(strings=ReceiverStrings())
            link = _Link(codec, data.draw(sinces))
            continue
        if op == "write":
            room = data.draw(st.sampled_from(rooms))
            req = HttpRequest(
                "PUT",
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t{k}".encode(),
                JSON,
                b'{"msgtype":"m.text","body":"hi"}',
            )
            msg = codec.encode_request(req, sender)
            if data.draw(st.booleans()):
                codec.decode_request(msg, receiver)  # else lost on the way
            continue
        if op == "duplicate":
            if link.sent:
                seq, msg, body = data.draw(st.sampled_from(link.sent))
                try:
                    got = _client_decode(codec, link.client, seq, msg, sender.strings)
                except UnknownStringReference:  # UnknownBase too
                    pass
                else:
                    assert got == body
            continue
        if pending is None:
            k += 1
            room = data.draw(st.sampled_from(rooms))
            text = data.draw(st.text(min_size=0, max_size=40))
            pending = _sync(k, room, text)
            if op == "large":
                value = json.loads(pending)
                value["pad"] = "x" * (BASE_MAX + 10)
                pending = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        link.seq = (link.seq + 1) % OBSERVE_MODULUS
        msg, kept = _server_notify(codec, link.server, link.seq, pending, receiver.strings)
        link.sent.append((link.seq, msg, pending))
        if data.draw(st.booleans()):
            continue  # the notification is lost: parked, re-sent with the next number
        # received in order: it always decodes, exactly
        assert _client_decode(codec, link.client, link.seq, msg, sender.strings) == pending
        if data.draw(st.booleans()) or resends > 15:
            link.server.delivered(link.seq, kept)  # the ACK arrived
            pending = None
            resends = 0
        else:
            resends += 1  # the ACK is lost: the same body again, next number


def test_property_exercises_bases_and_inherited_references(codec: WireCodec) -> None:
    """The property's moves reach both new paths (so it can fail)."""
    sender = SenderTokens(strings=SenderStrings(first_seq=5))
    receiver = ReceiverTokens(strings=ReceiverStrings())
    req = HttpRequest(
        "PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t".encode(), JSON, b"{}"
    )
    codec.decode_request(codec.encode_request(req, sender), receiver)
    server = ServerBase()
    _m, kept = _server_notify(codec, server, 1, _sync(1, ROOM, ""), receiver.strings)
    server.delivered(1, kept)
    msg, _ = _server_notify(codec, server, 2, _sync(2, ROOM, "x"), receiver.strings)
    assert msg.payload[0] == MARKER_DEFLATE_BASE and msg.first(n.OPT_STRING_SEQ) is None


def test_the_first_notification_is_relative_to_the_registrations_template(
    codec: WireCodec,
) -> None:
    """Before anything was delivered, the base is the template (d = 0) made of the
    registration's since: the corpus notification goes from 155 B to under 100 B."""
    first, second = _corpus_pair()
    since = json.loads(second)["rooms"]["join"]
    since = next(iter(since.values()))["timeline"]["prev_batch"]
    target = f"/_matrix/client/v3/sync?filter=0&since={since}&timeout=30000".encode()
    tmpl = codec.notification_template(target)
    assert tmpl is not None
    server, client = ServerBase(tmpl), ClientBases(tmpl)
    msg, kept = _server_notify(codec, server, 1, second)
    assert msg.payload[:2] == bytes((MARKER_DEFLATE_BASE, 0))
    assert len(msg.payload) < 100
    assert _client_decode(codec, client, 1, msg) == second
    assert kept.cbor is not None
    # a client without the template (a registration without since) refuses it
    with pytest.raises(UnknownBase):
        codec.decode_response(msg, bases=ClientBases().view(1))
    # later ones are relative to the template and the last delivered notification
    server.delivered(1, kept)
    msg, _ = _server_notify(codec, server, 2, first)
    assert msg.payload[0] == MARKER_DEFLATE_BASE
    assert _client_decode(codec, client, 2, msg) == first
    assert codec.notification_template(b"/_matrix/client/v3/sync?timeout=0") is None


def test_a_late_duplicate_changes_nothing_kept(codec: WireCodec) -> None:
    """Stale notifications (reordered, duplicated late) decode exactly, or are refused,
    and keep nothing: the base the server uses stays kept."""
    server, client = ServerBase(), ClientBases()
    first, cbor = _server_notify(codec, server, 1, _sync(1, ROOM, "words and words"))
    _client_decode(codec, client, 1, first)
    server.delivered(1, cbor)
    # the next one re-sent 2 * KEPT times (its ACKs lost), the last ACK arrives
    body = _sync(2, ROOM, "more and more words")
    resent = []
    for seq in range(2, 2 + 2 * KEPT):
        msg, cbor = _server_notify(codec, server, seq, body)
        assert _client_decode(codec, client, seq, msg) == body
        resent.append((seq, msg))
    server.delivered(seq, cbor)
    # the first re-sends arrive again, late (their base, 1, is still kept)
    for old, msg in resent[:KEPT]:
        assert _client_decode(codec, client, old, msg) == body
    nxt = _sync(3, ROOM, "the third")
    msg, _ = _server_notify(codec, server, seq + 1, nxt)
    assert msg.payload[0] == MARKER_DEFLATE_BASE
    assert _client_decode(codec, client, seq + 1, msg) == nxt


def test_an_unknown_base_is_refused_by_the_codec(codec: WireCodec) -> None:
    server = ServerBase()
    _first, cbor1 = _server_notify(codec, server, 1, _sync(1, ROOM, "first of all"))
    server.delivered(1, cbor1)
    m2, _ = _server_notify(codec, server, 2, _sync(2, ROOM, "second of all"))
    assert m2.payload[0] == MARKER_DEFLATE_BASE
    with pytest.raises(UnknownBase):
        codec.decode_response(m2, bases=ClientBases().view(2))  # a new registration
    with pytest.raises(RemoteProtocolError):
        codec.decode_response(m2)  # not decoded as a notification


def test_body_cbor_applies_the_caps() -> None:
    profile = load_profile(1)
    with pytest.raises(RemoteProtocolError):
        body_cbor(b"", profile, DEFAULT_BODY_LIMITS)


def test_the_template_depends_on_the_profile_and_since_alone(codec: WireCodec) -> None:
    """A registration encoded under a context predicted before the handshake and the
    server's established context give the same template."""
    target = b"/_matrix/client/v3/sync?since=s1_2_3&timeout=30000"
    other = WireCodec(load_profile(1), WireContext(("b", "corpus.example.org")))
    assert codec.notification_template(target) == other.notification_template(target)
    assert codec.notification_template(target) != codec.notification_template(
        b"/_matrix/client/v3/sync?since=s1_2_4&timeout=30000"
    )
