"""Golden wire vectors: every case re-encodes to exactly the stored bytes.

A failing test here means the wire changed.  If that was deliberate, regenerate
and commit the new vectors together with the change:

    .venv/bin/python tests/unit/test_vectors.py --regen
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from synapse_coap.mapping import numbers as n
from synapse_coap.mapping import samples
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.codec import WireCodec, significant_headers
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import ReceiverTokens, SenderTokens
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors" / "wire.json"
TOKEN = b"\x2a\x17"  # 2 bytes, like aiocoap's tokens
S = samples.SERVER
R = "remote.example"


def _corpus(file: str, name: str) -> dict[str, Any]:
    for line in (ROOT / "tests" / "corpus" / file).read_text().splitlines():
        entry: dict[str, Any] = json.loads(line)
        if entry["name"] == name:
            return entry
    raise KeyError(name)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _cases() -> list[dict[str, Any]]:
    """(name, kind, http message, context, token state, want_json) for every vector."""
    J = [("content-type", "application/json")]
    fed_txn = _corpus("federation.jsonl", "federation.send.m.room.message")["request"]
    sync = _corpus("client.jsonl", "sync.incremental")["response"]
    room = "!g5KE46L29qNGWXQmbxDO8XFf_VQVl4Wv0FpDc1X-dug"
    eid = samples.event_id(3)
    xm = samples.x_matrix(S, R, "ed25519:a_XyZw")
    req: list[tuple[str, HttpRequest, tuple[str, ...], list[str]]] = [
        ("send.sticky_token", samples.send_request(0, token="syt_tok"), (S,), ["syt_tok"]),
        ("send.bind_token", samples.send_request(1, token="syt_tok"), (S,), []),
        ("send.nio_escaped_no_auth", samples.send_request(2, escaped=True), (S,), []),
        (
            "send.second_token_ref",
            samples.send_request(3, token="syt_two"),
            (S,),
            ["syt_one", "syt_two"],
        ),
        (
            "sync.incremental",
            HttpRequest(
                "GET",
                b"/_matrix/client/v3/sync?filter=0&since=s32_4_2_3_3_1_1_4_0_1_1_1_1_1&timeout=30000",
                [("authorization", "Bearer t")],
            ),
            (S,),
            ["t"],
        ),
        (
            "sync.long_filter_query",
            HttpRequest(
                "GET",
                b"/_matrix/client/v3/sync?filter=" + b"%7B%22room%22%3A%7B%7D%7D" * 20,
                [("authorization", "Bearer t")],
            ),
            (S,),
            ["t"],
        ),
        (
            "versions",
            HttpRequest("GET", b"/_matrix/client/versions", [("host", "x"), ("user-agent", "nio")]),
            (),
            [],
        ),
        (
            "login",
            HttpRequest(
                "POST",
                b"/_matrix/client/v3/login",
                J,
                b'{"type":"m.login.password","identifier":{"type":"m.id.user","user":"alice"},"password":"pw"}',
            ),
            (S,),
            [],
        ),
        (
            "state.put_trailing_slash",
            HttpRequest(
                "PUT",
                f"/_matrix/client/v3/rooms/{room.replace('!', '%21')}/state/m.room.name/".encode(),
                [*J, ("authorization", "Bearer t")],
                b'{"name":"Lobby"}',
            ),
            (S,),
            ["t"],
        ),
        (
            "receipt",
            HttpRequest(
                "POST",
                f"/_matrix/client/v3/rooms/%21abc%3A{S}/receipt/m.read/{eid.replace('$', '%24')}".encode(),
                [*J, ("authorization", "Bearer t")],
                b"{}",
            ),
            (S,),
            ["t"],
        ),
        (
            "typing",
            HttpRequest(
                "PUT",
                f"/_matrix/client/v3/rooms/%21abc%3A{S}/typing/%40alice%3A{S}".encode(),
                [*J, ("authorization", "Bearer t")],
                b'{"typing":true,"timeout":30000}',
            ),
            (S,),
            ["t"],
        ),
        (
            "federation.send",
            samples.federation_send(fed_txn["body"], fed_txn["target"], R),
            (R, fed_txn["body"]["origin"]),
            [],
        ),
        (
            "federation.make_join",
            HttpRequest(
                "GET",
                f"/_matrix/federation/v1/make_join/{room.replace('!', '%21')}/%40bob%3A{R}?ver=10&ver=11".encode(),
                [("authorization", xm)],
            ),
            (S, R),
            [],
        ),
        ("key.server", HttpRequest("GET", b"/_matrix/key/v2/server"), (), []),
        (
            "media.upload_png",
            HttpRequest(
                "POST",
                b"/_matrix/media/v3/upload?filename=cat.png",
                [("content-type", "image/png"), ("authorization", "Bearer t")],
                b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            ),
            (S,),
            ["t"],
        ),
        (
            "media.download_v1",
            HttpRequest(
                "GET",
                f"/_matrix/client/v1/media/download/{S}/AbCdEfGhIjKlMnOpQrStUvWx?allow_redirect=true".encode(),
                [("authorization", "Bearer t")],
            ),
            (S,),
            ["t"],
        ),
        ("literal.unknown_path", HttpRequest("GET", b"/_synapse/admin/v1/server_version"), (), []),
        ("head.method", HttpRequest("HEAD", b"/_matrix/client/versions"), (), []),
        ("invalid_json_raw", HttpRequest("POST", b"/_matrix/client/v3/login", J, b"{oops"), (), []),
        (
            "access_token_in_query",
            HttpRequest("GET", b"/_matrix/client/v3/account/whoami?access_token=syt_q"),
            (),
            [],
        ),
        ("well_known.server", HttpRequest("GET", b"/.well-known/matrix/server"), (), []),
    ]
    resp: list[tuple[str, HttpResponse, tuple[str, ...], bool]] = [
        ("send.event_id", samples.send_response(0), (S,), False),
        ("sync.incremental", HttpResponse(200, J, _json(sync["body"])), (S,), False),
        (
            "not_found",
            HttpResponse(404, J, b'{"errcode":"M_NOT_FOUND","error":"Event not found."}'),
            (),
            False,
        ),
        (
            "rate_limited",
            HttpResponse(
                429,
                [*J, ("retry-after", "5")],
                b'{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":5000}',
            ),
            (),
            False,
        ),
        ("no_content", HttpResponse(204), (), False),
        (
            "redirect",
            HttpResponse(302, [("location", "https://example.org/_matrix/media/x")]),
            (),
            False,
        ),
        (
            "teapot",
            HttpResponse(418, [("content-type", "text/plain; charset=utf-8")], b"I'm a teapot"),
            (),
            False,
        ),
        (
            "media.jpeg",
            HttpResponse(
                200,
                [
                    ("content-type", "image/jpeg"),
                    ("content-disposition", "inline; filename=cat.jpg"),
                    ("cache-control", "public,max-age=86400,s-maxage=86400"),
                ],
                b"\xff\xd8\xff\xe0\x00\x10JFIF",
            ),
            (),
            False,
        ),
        ("versions.want_json", HttpResponse(200, J, b'{"versions":["v1.11"]}'), (), True),
        (
            "server_error",
            HttpResponse(500, J, b'{"errcode":"M_UNKNOWN","error":"Internal server error"}'),
            (),
            False,
        ),
        ("created", HttpResponse(201, [*J, ("etag", '"v1"')], b"{}"), (), False),
        ("empty_json", HttpResponse(200, J, b"{}"), (S,), False),
    ]
    out: list[dict[str, Any]] = []
    for name, r, names, acked in req:
        out.append(
            {
                "name": "request." + name,
                "kind": "request",
                "context": list(names),
                "acked_tokens": acked,
                "http": _http_request(r),
            }
        )
    for name, p, names, want in resp:
        out.append(
            {
                "name": "response." + name,
                "kind": "response",
                "context": list(names),
                "want_json": want,
                "answers": _ANSWERS.get(name, "GET"),
                "http": _http_response(p),
            }
        )
    return out


#: The method of the request a response vector answers (the code depends on it).
_ANSWERS = {"send.event_id": "PUT", "created": "POST", "no_content": "DELETE"}


def _answers(case: dict[str, Any]) -> int:
    return n.HTTP_TO_COAP_METHOD[case.get("answers", "GET")]


def _bytes_field(data: bytes, key: str) -> dict[str, str]:
    try:
        return {key: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {key + "_b64": base64.b64encode(data).decode()}


def _get_bytes(obj: dict[str, Any], key: str) -> bytes:
    if key in obj:
        return str(obj[key]).encode("utf-8")
    return base64.b64decode(obj[key + "_b64"])


def _http_request(r: HttpRequest) -> dict[str, Any]:
    return {
        "method": r.method,
        **_bytes_field(r.target, "target"),
        "headers": [list(h) for h in r.headers],
        **_bytes_field(r.body, "body"),
    }


def _http_response(r: HttpResponse) -> dict[str, Any]:
    return {
        "status": r.status,
        "headers": [list(h) for h in r.headers],
        **_bytes_field(r.body, "body"),
    }


def encode_case(case: dict[str, Any]) -> bytes:
    codec = WireCodec(load_profile(1), WireContext(tuple(case["context"])))
    http = case["http"]
    if case["kind"] == "request":
        req = HttpRequest(
            http["method"],
            _get_bytes(http, "target"),
            [tuple(h) for h in http["headers"]],
            _get_bytes(http, "body"),
        )
        sender = SenderTokens()
        for token in case["acked_tokens"]:
            warm = codec.encode_request(
                HttpRequest(
                    "GET", b"/_matrix/client/v3/sync", [("authorization", "Bearer " + token)]
                ),
                sender,
            )
            sender.acknowledge(warm)
        msg = codec.encode_request(req, sender)
        return encode_coap(msg, mtype=0, mid=0x1234, token=TOKEN)
    resp = HttpResponse(
        http["status"], [tuple(h) for h in http["headers"]], _get_bytes(http, "body")
    )
    return encode_coap(
        codec.encode_response(resp, want_json=case["want_json"], method=_answers(case)),
        mtype=2,
        mid=0x1234,
        token=TOKEN,
    )


def regenerate() -> None:
    cases = _cases()
    for case in cases:
        case["coap_hex"] = encode_case(case).hex()
        case["coap_bytes"] = len(case["coap_hex"]) // 2
    doc = {
        "comment": "Golden wire vectors (profile 1). Regenerate deliberately: python tests/unit/test_vectors.py --regen",
        "profile": 1,
        "cases": cases,
    }
    VECTORS.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} vectors written to {VECTORS}")


def _load() -> list[dict[str, Any]]:
    if not VECTORS.exists():  # only while regenerating from scratch
        return []
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"]
    return cases


def test_enough_vectors() -> None:
    cases = _load()
    assert sum(c["kind"] == "request" for c in cases) >= 20
    assert sum(c["kind"] == "response" for c in cases) >= 10
    assert len(cases) >= 20


@pytest.mark.parametrize("case", _load(), ids=lambda c: c["name"])
def test_vector_encodes_to_the_stored_bytes(case: dict[str, Any]) -> None:
    assert encode_case(case).hex() == case["coap_hex"], "wire changed: see this file's docstring"


@pytest.mark.parametrize("case", _load(), ids=lambda c: c["name"])
def test_vector_decodes_back_to_its_http_side(case: dict[str, Any]) -> None:
    codec = WireCodec(load_profile(1), WireContext(tuple(case["context"])))
    _t, _m, token, msg = decode_coap(bytes.fromhex(case["coap_hex"]))
    assert token == TOKEN
    http = case["http"]
    headers = significant_headers([(h[0], h[1]) for h in http["headers"]])
    if case["kind"] == "request":
        receiver = ReceiverTokens()
        for i, t in enumerate(case["acked_tokens"]):
            receiver.bind(bytes([i]) + t.encode())
        got = codec.decode_request(msg, receiver)
        assert got.method == http["method"] and got.target == _get_bytes(http, "target")
        assert got.headers == headers
    else:
        got_r = codec.decode_response(msg, method=_answers(case))
        assert got_r.status == http["status"] and got_r.headers == headers
        got_body = got_r.body
        sent = _get_bytes(http, "body")
        assert got_body == sent or json.loads(got_body) == json.loads(sent)


if __name__ == "__main__":
    if "--regen" in sys.argv[1:]:
        regenerate()
    else:
        print(__doc__)
