"""Short transaction ids in the sidecar (synapse_coap.proxy.txn): deterministic, smaller on
the wire, idempotent across a restart, and the client's own id back in responses."""

from __future__ import annotations

import asyncio
import json

from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import SenderTokens
from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions
from synapse_coap.proxy.txn import SHORT_LEN, TxnShortener, short_txn_id
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile

TOKEN = "syt_YWxpY2U_UkFnSXlRZUZJa0VCc0dWTWhJWk9_0lzFYj"
NIO_TXN = "64edaed5-ff50-4383-b2f5-78e4156264d4"
ROOM = "/_matrix/client/v3/rooms/!OqKjGxHzNaQcVwTyReAbCdEfGhIjKlMnOpQrStUvWxY/send/m.room.message/"
AUTH = (("authorization", f"Bearer {TOKEN}"), ("content-type", "application/json"))
BODY = b'{"msgtype":"m.text","body":"hello"}'


def shortener() -> TxnShortener:
    return TxnShortener(load_profile(0).routes)


def send(txn: str, token: str = TOKEN, query: str = "") -> HttpRequest:
    auth = (("authorization", f"Bearer {token}"), ("content-type", "application/json"))
    return HttpRequest("PUT", (ROOM + txn + query).encode(), auth, BODY)


def test_short_id_is_a_deterministic_digest_of_token_and_id() -> None:
    a = short_txn_id(TOKEN, NIO_TXN)
    assert len(a) == SHORT_LEN and a == short_txn_id(TOKEN, NIO_TXN)
    assert a != short_txn_id(TOKEN, NIO_TXN[:-1] + "5")
    assert a != short_txn_id(TOKEN + "x", NIO_TXN)


def test_nio_send_gets_the_short_id_in_its_path_and_nothing_else_changes() -> None:
    req = send(NIO_TXN, query="?a=1")
    out = shortener().shorten(req)
    assert out.target == (ROOM + short_txn_id(TOKEN, NIO_TXN) + "?a=1").encode()
    assert (out.method, out.headers, out.body) == (req.method, req.headers, req.body)


def test_a_restarted_sidecar_maps_a_retried_send_to_the_same_id() -> None:
    # no state: a new shortener (a restarted sidecar) gives the same target, so Synapse
    # de-duplicates the retry
    assert shortener().shorten(send(NIO_TXN)).target == shortener().shorten(send(NIO_TXN)).target


def test_other_requests_and_short_ids_are_left_alone() -> None:
    s = shortener()
    element = send("m17.3")  # already small on the wire
    assert s.shorten(element) is element
    no_auth = HttpRequest("PUT", (ROOM + NIO_TXN).encode(), (), BODY)
    assert s.shorten(no_auth) is no_auth
    get = HttpRequest("GET", b"/_matrix/client/v3/sync?timeout=30000", AUTH)
    assert s.shorten(get) is get
    state = HttpRequest(
        "PUT", b"/_matrix/client/v3/rooms/!r:hs/state/m.room.topic/" + NIO_TXN.encode(), AUTH, b"{}"
    )
    assert s.shorten(state) is state  # a state key, not a transaction id
    to_device = HttpRequest(
        "PUT", f"/_matrix/client/v3/sendToDevice/m.room_key/{NIO_TXN}".encode(), AUTH, b"{}"
    )
    assert s.shorten(to_device).target.endswith(short_txn_id(TOKEN, NIO_TXN).encode())


def test_the_send_is_13_bytes_smaller_on_the_wire() -> None:
    codec = WireCodec(load_profile(1), WireContext())
    tokens = SenderTokens()
    req = send(NIO_TXN)
    tokens.acknowledge(codec.encode_request(req, tokens))
    before = codec.encode_request(req, tokens)
    after = codec.encode_request(shortener().shorten(req), tokens)
    path = [o.value for o in before.options if o.number == 11]
    short_path = [o.value for o in after.options if o.number == 11]
    assert path[:-1] == short_path[:-1]
    # the UUID packs into 23 bytes (1 form + 22); the short id is 8 (1 option byte less)
    assert len(path[-1]) == 23 and len(short_path[-1]) == 8


def test_responses_get_the_clients_own_id_back() -> None:
    s = shortener()
    short = s.shorten(send(NIO_TXN)).target.rsplit(b"/", 1)[1].decode()
    sync = {
        "rooms": {
            "join": {
                "!r": {
                    "timeline": {
                        "events": [
                            {"event_id": "$a", "unsigned": {"transaction_id": short}},
                            {"event_id": "$b", "unsigned": {"transaction_id": "AAAAAAAA"}},
                        ]
                    }
                }
            }
        }
    }
    resp = HttpResponse(200, (("content-type", "application/json"),), json.dumps(sync).encode())
    out = json.loads(s.restore(resp).body)
    events = out["rooms"]["join"]["!r"]["timeline"]["events"]
    assert events[0]["unsigned"]["transaction_id"] == NIO_TXN
    assert events[1]["unsigned"]["transaction_id"] == "AAAAAAAA"  # not one of ours
    plain = HttpResponse(200, (), b'{"event_id":"$a"}')
    assert s.restore(plain) is plain


def test_sidecar_forwards_the_short_id_and_restores_it() -> None:
    seen: list[HttpRequest] = []

    class Client:
        async def request(
            self, endpoint: object, request: HttpRequest, *, timeout: float | None = None
        ) -> HttpResponse:
            seen.append(request)
            txn = request.target.rsplit(b"/", 1)[1].decode()
            body = json.dumps({"unsigned": {"transaction_id": txn}}).encode()
            return HttpResponse(200, (("content-type", "application/json"),), body)

    sidecar = Sidecar(Client(), None, options=SidecarOptions(cache=False))
    resp = asyncio.run(sidecar.forward(send(NIO_TXN)))
    assert seen[0].target.endswith(short_txn_id(TOKEN, NIO_TXN).encode())
    assert json.loads(resp.body)["unsigned"]["transaction_id"] == NIO_TXN
    off = Sidecar(Client(), None, options=SidecarOptions(cache=False, short_txn_ids=False))
    asyncio.run(off.forward(send(NIO_TXN)))
    assert seen[1].target.endswith(NIO_TXN.encode())
