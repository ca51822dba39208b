"""The session string table (wire/strings.py): exact under loss, duplication, reordering."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.codec import WireCodec, request_seq
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import ReceiverTokens, SenderTokens
from synapse_coap.wire.body import decode_body, encode_body
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile
from synapse_coap.wire.strings import (
    WINDOW,
    ReceiverStrings,
    SenderStrings,
    UnknownStringReference,
    identifiers,
    path_identifiers,
    response_identifiers,
    texts,
)

CTX = WireContext(("remote.example", "origin.example"))
CHANGED = n.code(2, 4)
SERVER_ERROR = n.code(5, 0)


@pytest.fixture(scope="module")
def codec() -> WireCodec:
    return WireCodec(load_profile(1), CTX)


def _id(sigil: str, seed: int) -> str:
    raw = random.Random(seed).randbytes(32)
    return sigil + base64.urlsafe_b64encode(raw).decode().rstrip("=")


POOL = [_id("$", i) for i in range(8)] + [_id("!", 100 + i) for i in range(2)]


def _request(k: int, room: str, auth: list[str], prev: list[str]) -> HttpRequest:
    txn = {
        "origin": "origin.example",
        "pdus": [
            {
                "room_id": room,
                "auth_events": auth,
                "prev_events": prev,
                "content": {"body": f"message {k}", "msgtype": "m.text"},
                "type": "m.room.message",
            }
        ],
    }
    body = json.dumps(txn, separators=(",", ":"), ensure_ascii=False).encode()
    target = f"/_matrix/federation/v1/send/{1000 + k}".encode()
    return HttpRequest("PUT", target, (("content-type", "application/json"),), body)


def _sender(first: int = 0) -> SenderTokens:
    return SenderTokens(strings=SenderStrings(first_seq=first))


def _receiver() -> ReceiverTokens:
    return ReceiverTokens(strings=ReceiverStrings())


def _ack(codec: WireCodec, sender: SenderTokens, msg: CoapMessage, resp: CoapMessage) -> bool:
    """What the client does with a response: bookkeeping, then the decode that
    acknowledges a 2.xx to the string table. True: "resend once"."""
    if sender.on_response(msg, resp):
        return True
    if resp.code >> 5 == 2:
        codec.decode_response(resp, method=msg.code, strings=sender.strings, seq=request_seq(msg))
    return False


def _has_refs(msg: CoapMessage, codec: WireCodec) -> bool:
    """True if the message needs a string table to decode."""
    try:
        codec.decode_request(msg, _receiver())
    except UnknownStringReference:
        return True
    return False


# --- pieces -----------------------------------------------------------------------------


def test_identifiers_are_distinct_hash_ids_in_document_order() -> None:
    a, b, room = POOL[0], POOL[1], POOL[8]
    value = {
        "x": [b, {"k": a}, b],
        a: "keys do not count",
        "room": room,
        "short": "$abc",
        "bad": "$" + "A" * 42 + "B",  # not canonical base64 of 32 bytes
    }
    assert identifiers(value) == (b, a, room)
    assert identifiers([[[[]]]]) == ()


def test_body_without_refs_is_unchanged_and_refs_round_trip(codec: WireCodec) -> None:
    profile = load_profile(1)
    value = {"room_id": POOL[8], "auth_events": POOL[:3], "prev_events": [POOL[4]]}
    plain = encode_body(value, profile, CTX)
    assert encode_body(value, profile, CTX, {}) == plain
    refs = {POOL[8]: (4, 0), POOL[0]: (4, 1), POOL[1]: (4, 2), POOL[2]: (5, 64 + 3)}
    table = {(4, 0): POOL[8], (4, 1): POOL[0], (4, 2): POOL[1], (5, 67): POOL[2]}
    short = encode_body(value, profile, CTX, refs)
    assert len(short) < len(plain) - 3 * 30
    assert decode_body(short, profile, CTX, resolve=lambda t, i: table[(t, i)]) == value
    with pytest.raises(RemoteProtocolError):
        decode_body(short, profile, CTX)  # a reference without a table never decodes


def test_warm_request_shrinks_and_decodes(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    first = _request(0, POOL[8], POOL[:2], [POOL[2]])
    m1 = codec.encode_request(first, sender)
    assert codec.decode_request(m1, receiver) == first
    second = _request(1, POOL[8], POOL[:2], [POOL[3]])
    # not acknowledged yet: no references
    m2 = codec.encode_request(second, sender)
    assert not _has_refs(m2, codec)
    _ack(codec, sender, m1, CoapMessage(CHANGED, (), b""))
    m3 = codec.encode_request(second, sender)
    assert _has_refs(m3, codec)
    assert len(m3.payload) <= len(m2.payload) - 90  # room id + two auth events
    assert codec.decode_request(m3, receiver) == second


def test_error_response_is_not_an_acknowledgement(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    m1 = codec.encode_request(_request(0, POOL[8], POOL[:2], [POOL[2]]), sender)
    codec.decode_request(m1, receiver)
    _ack(codec, sender, m1, CoapMessage(SERVER_ERROR, (), b""))
    m2 = codec.encode_request(_request(1, POOL[8], POOL[:2], [POOL[3]]), sender)
    assert not _has_refs(m2, codec)


def test_server_restart_gives_reset_then_resend_without_references(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    m1 = codec.encode_request(_request(0, POOL[8], POOL[:2], [POOL[2]]), sender)
    codec.decode_request(m1, receiver)
    _ack(codec, sender, m1, CoapMessage(CHANGED, (), b""))
    req = _request(1, POOL[8], POOL[:2], [POOL[3]])
    m2 = codec.encode_request(req, sender)
    fresh = _receiver()  # restarted server: new session, empty table
    with pytest.raises(UnknownStringReference) as info:
        codec.decode_request(m2, fresh)
    reset = codec.unknown_token_response(info.value)
    assert reset.code == n.BAD_REQUEST and reset.first(n.OPT_STRING_RESET) is not None
    assert sender.on_response(m2, reset) is True  # "resend once"
    m3 = codec.encode_request(req, sender)
    assert not _has_refs(m3, codec)
    assert codec.decode_request(m3, fresh) == req


def test_sequence_numbers_continue_across_renewal(codec: WireCodec) -> None:
    sender = _sender(7)
    m1 = codec.encode_request(_request(0, POOL[8], [], [POOL[2]]), sender)
    renewed = sender.renewed()
    m2 = codec.encode_request(_request(1, POOL[8], [], [POOL[3]]), renewed)
    assert m1.first(n.OPT_STRING_SEQ) == b"\x07" and m2.first(n.OPT_STRING_SEQ) == b"\x08"


def test_one_number_with_two_contents_is_poisoned() -> None:
    table = ReceiverStrings()
    table.record(5, (POOL[0],))
    table.record(5, (POOL[0],))  # a duplicate: harmless
    assert table.resolver(6)(4, 0) == POOL[0]
    table.record(5, (POOL[1],))
    with pytest.raises(UnknownStringReference):
        table.resolver(6)(4, 0)


def test_no_table_no_option_and_todays_bytes(codec: WireCodec) -> None:
    req = _request(0, POOL[8], POOL[:2], [POOL[2]])
    assert codec.encode_request(req) == codec.encode_request(req, SenderTokens())
    assert codec.encode_request(req).first(n.OPT_STRING_SEQ) is None


def test_references_outside_the_window_are_not_used(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    m0 = codec.encode_request(_request(0, POOL[8], [], [POOL[0]]), sender)
    codec.decode_request(m0, receiver)
    _ack(codec, sender, m0, CoapMessage(CHANGED, (), b""))
    for k in range(1, WINDOW + 1):
        codec.encode_request(_request(k, POOL[9], [], [POOL[1]]), sender)  # never answered
    late = _request(99, POOL[8], [], [POOL[0]])
    m = codec.encode_request(late, sender)
    assert not _has_refs(m, codec)
    assert codec.decode_request(m, receiver) == late


# --- the property -----------------------------------------------------------------------

OPS = ("new",) * 6 + ("deliver",) * 10 + ("respond",) * 10 + ("drop",) * 2 + ("restart", "renew")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_loss_duplication_reordering_never_decodes_wrongly(data: st.DataObject) -> None:
    codec = WireCodec(load_profile(1), CTX)
    sender = _sender(data.draw(st.sampled_from([0, 250, 65530, (1 << 24) - 3])))
    receiver = _receiver()
    originals: dict[int, HttpRequest] = {}
    in_flight: list[tuple[int, CoapMessage]] = []  # requests on the way to the server
    answers: list[tuple[int, CoapMessage, CoapMessage]] = []  # responses on the way back
    decoded = referenced = 0
    ids = st.sampled_from(POOL[:8])
    for _step in range(data.draw(st.integers(10, 80))):
        op = data.draw(st.sampled_from(OPS))
        if op == "new" or not (in_flight or answers):
            k = len(originals)
            req = _request(
                k,
                data.draw(st.sampled_from(POOL[8:])),
                data.draw(st.lists(ids, max_size=3)),
                data.draw(st.lists(ids, min_size=1, max_size=2)),
            )
            originals[k] = req
            in_flight.append((k, codec.encode_request(req, sender)))
        elif op == "deliver" and in_flight:
            i = data.draw(st.integers(0, len(in_flight) - 1))
            k, msg = in_flight[i] if data.draw(st.booleans()) else in_flight.pop(i)
            try:
                got = codec.decode_request(msg, receiver)
            except UnknownStringReference as e:
                answers.append((k, msg, codec.unknown_token_response(e)))
                continue
            assert got == originals[k]  # never a wrong decode
            decoded += 1
            referenced += _has_refs(msg, codec)
            status = data.draw(st.sampled_from([CHANGED, CHANGED, SERVER_ERROR]))
            answers.append((k, msg, CoapMessage(status, (), b"")))
        elif op == "respond" and answers:
            i = data.draw(st.integers(0, len(answers) - 1))
            k, msg, resp = answers[i] if data.draw(st.booleans()) else answers.pop(i)
            if _ack(codec, sender, msg, resp):
                again = codec.encode_request(originals[k], sender)
                assert not _has_refs(again, codec)  # the resend always decodes
                in_flight.append((k, again))
        elif op == "drop":
            pool: list[Any] = data.draw(st.sampled_from([in_flight, answers]))
            if pool:
                pool.pop(data.draw(st.integers(0, len(pool) - 1)))
        elif op == "restart":
            receiver = _receiver()  # server restart: old messages still arrive
        elif op == "renew":
            sender, receiver = sender.renewed(), _receiver()  # a new Noise session
    assert decoded >= referenced


def test_property_exercises_references(codec: WireCodec) -> None:
    """A lossless, in-order run: after the first exchange every request uses references."""
    sender, receiver = _sender(), _receiver()
    sizes = []
    for k in range(5):
        req = _request(k, POOL[8], POOL[:2], [POOL[k + 2]])
        msg = codec.encode_request(req, sender)
        assert codec.decode_request(msg, receiver) == req
        assert _ack(codec, sender, msg, CoapMessage(CHANGED, (), b"")) is False
        sizes.append(len(msg.payload))
    assert all(s < sizes[0] - 60 for s in sizes[1:])


# --- path arguments and response identifiers ---------------------------------------------

ROOM, OTHER_ROOM = POOL[8], POOL[9]
JSON = (("content-type", "application/json"),)


def _sync(since: str = "s1") -> HttpRequest:
    return HttpRequest("GET", f"/_matrix/client/v3/sync?since={since}&timeout=0".encode(), ())


def _send(room: str, k: int, text: str = "hi") -> HttpRequest:
    body = json.dumps({"msgtype": "m.text", "body": text}, separators=(",", ":")).encode()
    quoted = room.replace("!", "%21")
    target = f"/_matrix/client/v3/rooms/{quoted}/send/m.room.message/t{k}".encode()
    return HttpRequest("PUT", target, JSON, body)


def _sync_body(*rooms: str, event: str = POOL[0]) -> bytes:
    value = {
        "next_batch": "s2",
        "rooms": {"join": {r: {"timeline": {"events": [{"event_id": event}]}} for r in rooms}},
    }
    return json.dumps(value, separators=(",", ":")).encode()


def _serve(
    codec: WireCodec, receiver: ReceiverTokens, msg: CoapMessage, body: bytes
) -> CoapMessage:
    """What the server does: decode, then answer 200 with ``body`` (JSON)."""
    codec.decode_request(msg, receiver)
    return codec.encode_response(
        HttpResponse(200, JSON, body),
        method=msg.code,
        strings=receiver.strings,
        seq=request_seq(msg),
    )


def test_path_and_response_identifiers() -> None:
    assert path_identifiers(_send(ROOM, 1).target) == (ROOM,)
    assert path_identifiers(b"/_matrix/client/v3/rooms/%21abc/send/x/1") == ()
    body = _sync_body(OTHER_ROOM, ROOM, event=POOL[3])
    # rooms first (keys of rooms.join count), then events
    assert response_identifiers(body) == (OTHER_ROOM, ROOM, POOL[3])
    assert response_identifiers(b"not json") == ()


def test_a_room_learnt_from_sync_is_a_short_path_reference(codec: WireCodec) -> None:
    sender, receiver = _sender(0x5A5A5A), _receiver()
    cold = codec.encode_request(_send(ROOM, 1), sender)  # nothing acknowledged yet
    sync = codec.encode_request(_sync(), sender)
    assert sync.first(n.OPT_STRING_SEQ) is not None  # numbered for its response's rooms
    answer = _serve(codec, receiver, sync, _sync_body(ROOM))
    assert _ack(codec, sender, sync, answer) is False
    warm = codec.encode_request(_send(ROOM, 2), sender)
    assert codec.decode_request(warm, receiver) == _send(ROOM, 2)
    assert _has_refs(warm, codec)
    room_arg = [o.value for o in warm.options if o.number == n.URI_PATH][1]
    assert len(room_arg) <= 3
    cold_size = sum(len(o.value) for o in cold.options) + len(cold.payload)
    warm_size = sum(len(o.value) for o in warm.options) + len(warm.payload)
    assert warm_size <= cold_size - 30
    # the send itself recorded the room: the next one references it too
    _ack(codec, sender, warm, codec.encode_response(HttpResponse(200), method=warm.code))
    again = codec.encode_request(_send(ROOM, 3), sender)
    assert codec.decode_request(again, receiver) == _send(ROOM, 3)


def test_an_observe_registration_is_not_numbered(codec: WireCodec) -> None:
    sender = _sender(5)
    assert codec.encode_request(_sync(), sender, observe=True).first(n.OPT_STRING_SEQ) is None
    assert codec.encode_request(_sync(), sender).first(n.OPT_STRING_SEQ) == b"\x05"


def test_a_request_run_twice_with_two_answers_is_poisoned(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    sync = codec.encode_request(_sync(), sender)
    first = _serve(codec, receiver, sync, _sync_body(ROOM))
    _serve(codec, receiver, sync, _sync_body(OTHER_ROOM))  # duplicate, another answer
    _ack(codec, sender, sync, first)
    warm = codec.encode_request(_send(ROOM, 1), sender)
    assert _has_refs(warm, codec)
    with pytest.raises(UnknownStringReference):
        codec.decode_request(warm, receiver)  # never a wrong room: a reset, then a resend


def test_a_bare_argument_that_looks_like_a_reference_stays_exact(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    sync = codec.encode_request(_sync(), sender)
    _ack(codec, sender, sync, _serve(codec, receiver, sync, _sync_body(ROOM)))
    odd = HttpRequest("PUT", b"/_matrix/client/v3/rooms/%7F%00/send/m.room.message/t1", JSON, b"{}")
    msg = codec.encode_request(odd, sender)
    assert codec.decode_request(msg, receiver) == odd
    assert codec.decode_request(codec.encode_request(odd), _receiver()) == odd


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_client_traffic_with_answers_never_decodes_wrongly(data: st.DataObject) -> None:
    """Sends and syncs whose answers name rooms, and push notifications, under loss,
    duplication (a request run twice may answer differently), reordering and new
    sessions."""
    codec = WireCodec(load_profile(2), CTX)
    sender = _sender(data.draw(st.sampled_from([0, 65530, (1 << 24) - 3])))
    receiver = _receiver()
    originals: dict[int, HttpRequest] = {}
    in_flight: list[tuple[int, CoapMessage]] = []
    answers: list[tuple[int, CoapMessage, CoapMessage]] = []
    decoded = referenced = 0
    rooms = st.sampled_from([ROOM, OTHER_ROOM])
    for _step in range(data.draw(st.integers(10, 80))):
        op = data.draw(st.sampled_from(OPS))
        if op == "new" or not (in_flight or answers):
            k = len(originals)
            req = _send(data.draw(rooms), k) if data.draw(st.booleans()) else _sync(f"s{k}")
            originals[k] = req
            in_flight.append((k, codec.encode_request(req, sender)))
        elif op == "deliver" and in_flight:
            i = data.draw(st.integers(0, len(in_flight) - 1))
            k, msg = in_flight[i] if data.draw(st.booleans()) else in_flight.pop(i)
            try:
                got = codec.decode_request(msg, receiver)
            except UnknownStringReference as e:
                answers.append((k, msg, codec.unknown_token_response(e)))
                continue
            assert got == originals[k]  # never a wrong decode
            decoded += 1
            referenced += _has_refs(msg, codec)
            if data.draw(st.integers(0, 3)) == 0:
                resp = CoapMessage(SERVER_ERROR, (), b"")
            else:
                body = _sync_body(*data.draw(st.lists(rooms, max_size=2, unique=True)))
                resp = codec.encode_response(
                    HttpResponse(200, JSON, body),
                    method=msg.code,
                    strings=receiver.strings,
                    seq=request_seq(msg),
                )
            answers.append((k, msg, resp))
        elif op == "respond" and answers:
            i = data.draw(st.integers(0, len(answers) - 1))
            k, msg, resp = answers[i] if data.draw(st.booleans()) else answers.pop(i)
            if _ack(codec, sender, msg, resp):
                again = codec.encode_request(originals[k], sender)
                assert not _has_refs(again, codec)
                in_flight.append((k, again))
            if data.draw(st.booleans()):
                # a push notification naming rooms: exact, or refused; never wrong
                body = _sync_body(*data.draw(st.lists(rooms, max_size=2, unique=True)))
                note = _notification(codec, receiver, body)
                try:
                    got_note = codec.decode_response(note, strings=sender.strings)
                except UnknownStringReference:
                    continue
                assert got_note.body == body
        elif op == "drop":
            pool: list[Any] = data.draw(st.sampled_from([in_flight, answers]))
            if pool:
                pool.pop(data.draw(st.integers(0, len(pool) - 1)))
        elif op in ("restart", "renew"):
            # A server's table lives exactly as long as the Noise session: a restarted
            # server lost the session's keys too, so the client makes a new session, and
            # nothing of the old one reaches the new table. (Answers recorded per number
            # rely on this: a table reset under a live session could hear a request run
            # again, answered otherwise, without knowing the first answer.)
            sender, receiver = sender.renewed(), _receiver()
            in_flight.clear()
            answers.clear()
    assert decoded >= referenced


def _notification(codec: WireCodec, receiver: ReceiverTokens, body: bytes) -> CoapMessage:
    return codec.encode_response(HttpResponse(200, JSON, body), references=receiver.strings)


def test_a_notification_references_the_room_the_client_sent_to(codec: WireCodec) -> None:
    sender, receiver = _sender(0x5A5A5A), _receiver()
    body = _sync_body(ROOM, event=POOL[5])
    cold = _notification(codec, receiver, body)  # nothing recorded: no references
    assert cold.first(n.OPT_STRING_SEQ) is None
    send = codec.encode_request(_send(ROOM, 1), sender)
    codec.decode_request(send, receiver)  # recorded, not yet answered: the client has it
    warm = _notification(codec, receiver, body)
    assert warm.first(n.OPT_STRING_SEQ) == (0x5A5A5A).to_bytes(3, "big")
    assert len(warm.payload) <= len(cold.payload) - 30
    got = codec.decode_response(warm, strings=sender.strings)
    assert got.body == body
    with pytest.raises(UnknownStringReference):
        codec.decode_response(warm, strings=_sender().strings)  # another client session
    with pytest.raises(UnknownStringReference):
        codec.decode_response(warm)  # no table at all


def test_a_notification_references_what_the_client_was_answered_with(
    codec: WireCodec,
) -> None:
    """The event id a send was answered with comes back as a reference in the echo;
    a client that never got that answer cannot resolve it (refused, never wrong)."""
    sender, receiver = _sender(), _receiver()
    send = codec.encode_request(_send(ROOM, 1), sender)
    answer = json.dumps({"event_id": POOL[7]}).encode()
    resp = _serve(codec, receiver, send, answer)
    body = _sync_body(ROOM, event=POOL[7])
    note = _notification(codec, receiver, body)
    # the event id (after the room) is a reference: much less than its 32 bytes
    plain = codec.encode_response(HttpResponse(200, JSON, body))
    assert len(note.payload) <= len(plain.payload) - 60
    # a client that missed the answer has the room but not the event id
    with pytest.raises(UnknownStringReference):
        codec.decode_response(note, strings=sender.strings)
    assert not _ack(codec, sender, send, resp)
    assert codec.decode_response(note, strings=sender.strings).body == body


def test_a_poisoned_number_is_never_referenced_by_a_notification(codec: WireCodec) -> None:
    sender, receiver = _sender(), _receiver()
    send = codec.encode_request(_send(ROOM, 1), sender)
    codec.decode_request(send, receiver)
    receiver.strings.record(request_seq(send), (OTHER_ROOM,))  # type: ignore[union-attr,arg-type]
    assert _notification(codec, receiver, _sync_body(ROOM)).first(n.OPT_STRING_SEQ) is None


def test_texts_are_strings_with_a_space() -> None:
    value = {"body": "a message of some words", "msgtype": "m.text", "sig": "A" * 86}
    assert texts(value) == ("a message of some words",)
    assert texts({"k": "short text"}) == ()  # under MIN_TEXT


def test_the_echo_of_the_clients_own_message_references_its_text(codec: WireCodec) -> None:
    text = "the quick brown fox jumps over the lazy dog, twice over"
    sender, receiver = _sender(), _receiver()
    send = codec.encode_request(_send(ROOM, 1, text), sender)
    codec.decode_request(send, receiver)
    echo = {
        "next_batch": "s9",
        "rooms": {
            "join": {
                ROOM: {
                    "timeline": {
                        "events": [
                            {"content": {"body": text, "msgtype": "m.text"}, "event_id": POOL[4]}
                        ]
                    }
                }
            }
        },
    }
    body = json.dumps(echo, separators=(",", ":")).encode()
    cold = codec.encode_response(HttpResponse(200, JSON, body))
    warm = _notification(codec, receiver, body)
    assert len(warm.payload) <= len(cold.payload) - 60  # the text and the room: 141 -> 60 B
    assert codec.decode_response(warm, strings=sender.strings).body == body


def test_a_token_reset_does_not_make_notifications_undecodable(codec: WireCodec) -> None:
    """Token-Reset means the server lost a token binding, not its string table: the
    client keeps what it sent, so the server's references still resolve."""
    sender, receiver = _sender(), _receiver()
    send = codec.encode_request(_send(ROOM, 1), sender)
    codec.decode_request(send, receiver)
    reset = CoapMessage(n.UNAUTHORIZED, (CoapOption(n.OPT_TOKEN_RESET, b""),), b"")
    assert sender.on_response(send, reset) is True  # forgets its acknowledgements
    note = _notification(codec, receiver, _sync_body(ROOM))
    assert note.first(n.OPT_STRING_SEQ) is not None
    assert codec.decode_response(note, strings=sender.strings).body == _sync_body(ROOM)


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _hash_id_by_decoding(s: str) -> bool:
    """The definition: a sigil and 43 url-safe base64 characters that decode to 32 bytes
    and encode back to themselves."""
    if len(s) != 44 or s[0] not in "$!" or not set(s[1:]) <= set(_B64URL):
        return False
    raw = base64.urlsafe_b64decode(s[1:] + "=")
    return len(raw) == 32 and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == s[1:]


def test_hash_id_every_last_character() -> None:
    from synapse_coap.wire.strings import _is_hash_id

    body = POOL[0][:-1]
    canonical = [c for c in _B64URL + "=+/ é" if _is_hash_id(body + c)]
    assert canonical == list("AEIMQUYcgkosw048")
    for c in _B64URL + "=+/ é":
        assert _is_hash_id(body + c) == _hash_id_by_decoding(body + c)
    for i in range(1, 44):  # each other place: a character outside the alphabet
        for c in "=+/ .é$!\n":
            s = POOL[0][:i] + c + POOL[0][i + 1 :]
            assert not _is_hash_id(s) and not _hash_id_by_decoding(s)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from("$!@#"),
    st.text(alphabet=_B64URL + "=+/ é", min_size=41, max_size=44),
)
def test_hash_id_is_the_decode_definition(sigil: str, rest: str) -> None:
    from synapse_coap.wire.strings import _is_hash_id

    s = sigil + rest
    assert _is_hash_id(s) == _hash_id_by_decoding(s)


def _nested_values() -> Any:
    from tests.unit.test_body import json_values

    ids = st.sampled_from([*POOL, "a message with spaces", "x" * 20 + " y"])
    return st.recursive(
        json_values | ids,
        lambda children: (
            st.lists(children, max_size=6)
            | st.tuples(children, children)
            | st.dictionaries(st.text(max_size=3) | ids, children, max_size=6)
        ),
        max_leaves=30,
    )


def _walk(value: Any, keys: bool, out: list[str]) -> list[str]:
    """Every string in document order, recursively: the oracle of the package's walk."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if keys:
                _walk(k, keys, out)
            _walk(v, keys, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk(v, keys, out)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_nested_values())
def test_one_walk_gives_every_string_in_order(value: Any) -> None:
    """A request's identifiers and texts come from one list of its string values (and a
    response's reference walk from one with the map keys), in document order."""
    from synapse_coap.wire import strings as s

    assert s._strings(value) == _walk(value, False, [])
    assert s._strings(value, keys=True) == _walk(value, True, [])
    found: dict[str, None] = {}
    for item in _walk(value, False, []):
        if s._is_hash_id(item):
            found[item] = None
    assert s.identifiers(value) == tuple(found)[: s.MAX_IDS]
    assert s.request_identifiers(b"/x", value) == s._merge((s.identifiers(value), s.texts(value)))
