"""The reference messages behind the wire's size targets (used by tests, vectors and bench).

Deterministic: every random part comes from a seeded ``random.Random``.
"""

from __future__ import annotations

import base64
import json
import random
import string
from typing import Any

from synapse_coap.mapping.coap import encode_coap
from synapse_coap.mapping.messages import CoapMessage, HttpRequest, HttpResponse

SERVER = "example.org"
#: aiocoap's TokenManager.next_token(): a counter started at random.randint(0, 65535),
#: with leading zero bytes stripped -> 2 bytes (1 only below 256).
AIOCOAP_TOKEN_LENGTH = 2
SEND_BODY = b'{"msgtype":"m.text","body":"Hello world"}'
REQUEST_TARGET_BYTES = 64
RESPONSE_TARGET_BYTES = 48
FEDERATION_TARGET_RATIO = 0.45


def datagram_size(msg: CoapMessage) -> int:
    """Bytes of the whole CoAP message (header + aiocoap-sized token + options + payload)."""
    return len(encode_coap(msg, token=b"\x5a" * AIOCOAP_TOKEN_LENGTH))


def send_target(seed: int = 0, *, server: str = SERVER, escaped: bool = False) -> bytes:
    """``/_matrix/client/v3/rooms/!<18 letters>:<server>/send/m.room.message/m<13 digits>.<n>``."""
    rng = random.Random(seed)
    room = "".join(rng.choice(string.ascii_letters) for _ in range(18))
    ts = rng.randrange(10**12, 10**13)
    n = rng.randrange(0, 100)
    room_id = f"!{room}:{server}"
    if escaped:
        room_id = room_id.replace("!", "%21").replace(":", "%3A")
    return f"/_matrix/client/v3/rooms/{room_id}/send/m.room.message/m{ts}.{n}".encode()


def send_request(seed: int = 0, *, token: str | None = None, escaped: bool = False) -> HttpRequest:
    headers = [("content-type", "application/json")]
    if token is not None:
        headers.append(("authorization", "Bearer " + token))
    return HttpRequest("PUT", send_target(seed, escaped=escaped), headers, SEND_BODY)


def event_id(seed: int = 0) -> str:
    rng = random.Random(seed)
    return "$" + base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=")


def send_response(seed: int = 0, *, synapse_headers: bool = True) -> HttpResponse:
    """``200 {"event_id": "$<43 url-safe base64>"}`` as Synapse sends it."""
    body = json.dumps({"event_id": event_id(seed)}, separators=(",", ":")).encode()
    headers = [("content-type", "application/json")]
    if synapse_headers:
        headers.append(("cache-control", "no-cache, no-store, must-revalidate"))
    return HttpResponse(200, headers, body)


def x_matrix(origin: str, destination: str, key_id: str = "ed25519:a_test", seed: int = 0) -> str:
    """An X-Matrix header in exactly the form Synapse's federation client writes it."""
    sig = base64.b64encode(random.Random(seed).randbytes(64)).decode().rstrip("=")
    return f'X-Matrix origin="{origin}",key="{key_id}",sig="{sig}",destination="{destination}"'


def federation_send(
    txn: dict[str, Any], target: str, destination: str, seed: int = 0
) -> HttpRequest:
    """A federation transaction PUT with canonical-JSON body and an X-Matrix header."""
    body = json.dumps(txn, separators=(",", ":"), ensure_ascii=False).encode()
    auth = x_matrix(str(txn.get("origin", "origin.example")), destination, seed=seed)
    return HttpRequest(
        "PUT",
        target.encode(),
        [("content-type", "application/json"), ("authorization", auth)],
        body,
    )


def warm_session_request(
    codec: Any, previous: HttpRequest, request: HttpRequest, first_seq: int = 0x5A5A5A
) -> CoapMessage:
    """``request`` as a Noise session sends it after ``previous`` was acknowledged (2.04).

    Uses a session string table on both ends (a 3-byte sequence number, as a
    client session's random start gives), checks the exact round trip, and
    returns the message.
    """
    from synapse_coap.mapping.codec import request_seq
    from synapse_coap.mapping.tokens import ReceiverTokens, SenderTokens
    from synapse_coap.wire.strings import ReceiverStrings, SenderStrings

    sender = SenderTokens(strings=SenderStrings(first_seq=first_seq))
    receiver = ReceiverTokens(strings=ReceiverStrings())
    first = codec.encode_request(previous, sender)
    codec.decode_request(first, receiver)
    answer = CoapMessage(0x44, (), b"")  # 2.04 Changed
    sender.on_response(first, answer)
    codec.decode_response(answer, method=first.code, strings=sender.strings, seq=request_seq(first))
    msg: CoapMessage = codec.encode_request(request, sender)
    back = codec.decode_request(msg, receiver)
    if back.target != request.target or json.loads(back.body) != json.loads(request.body):
        raise AssertionError("warm-session request did not round-trip")
    return msg
