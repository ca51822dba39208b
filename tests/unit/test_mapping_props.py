"""Hypothesis: arbitrary requests/responses round-trip; arbitrary bytes parse or raise."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.codec import WireCodec, significant_headers
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import ReceiverTokens, SenderTokens
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile

CTX = WireContext(("example.org", "b.test"))
CODEC = WireCodec(load_profile(1), CTX)
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.sampled_from(
    [
        "!abc:example.org",
        "@u:b.test",
        "$" + "A" * 43,
        "m1700000000000.3",
        "m.room.message",
        "",
        "x y",
        "é/🙂",
        "%2F",
        "\x00\x01",
    ]
)
segment_text = st.one_of(ids, st.text(max_size=20))


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        route = draw(st.sampled_from(CODEC.routes.routes))
        parts = [""]
        style = draw(st.sampled_from(["quote", "raw", "js"]))
        from urllib.parse import quote

        for seg in route.segments:
            if isinstance(seg, str):
                parts.append(seg)
            else:
                v = draw(segment_text)
                if style == "quote" or seg.tail:
                    parts.append(quote(v, safe="/" if seg.tail else ""))
                elif style == "js":
                    parts.append(quote(v, safe="!'()*"))
                else:
                    parts.append(v.replace("%", "%25").replace("/", "%2F").replace("?", "%3F"))
        path = "/".join(parts).encode("utf-8", "surrogatepass")
    elif kind == 1:
        path = b"/" + draw(st.binary(max_size=60))
    elif kind == 2:
        path = draw(st.binary(min_size=1, max_size=60))
    else:
        path = b"/_matrix/client/v3/sync"
    if draw(st.booleans()):
        params = draw(
            st.lists(
                st.one_of(
                    st.sampled_from(
                        [
                            "timeout=30000",
                            "since=s1_2_3",
                            "filter=0",
                            "access_token=abc",
                            "a",
                            "",
                            "=",
                            "dir=b",
                        ]
                    ),
                    st.text(max_size=300).map(
                        lambda t: "filter=" + t.replace("&", "%26").replace("#", "")
                    ),
                ),
                max_size=6,
            )
        )
        path += b"?" + "&".join(params).encode("utf-8", "surrogatepass")
    return path


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)

header_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
    max_size=40,
)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain; charset=utf-8",
        "image/png",
        "video/mp4",
        "",
        "application/json; x=y",
    ]
)


@st.composite
def headers(draw: st.DrawFn, response: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    names = [
        "cache-control",
        "etag",
        "retry-after",
        "location",
        "content-disposition",
        "x-junk",
        "host",
    ]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(names))
        value = draw(
            st.one_of(
                header_values,
                st.sampled_from(['"v1"', "max-age=60", "no-cache, no-store, must-revalidate", "5"]),
            )
        )
        out.append((name, value))
    if not response:
        auth = draw(
            st.sampled_from(
                [
                    None,
                    "Bearer syt_a",
                    "Bearer syt_b",
                    'X-Matrix origin="example.org",key="ed25519:a_x",sig="'
                    + "A" * 86
                    + '",destination="b.test"',
                    "Basic x",
                ]
            )
        )
        if auth:
            out.append(("authorization", auth))
    return out


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[str, str]], bytes]:
    ct = draw(st.one_of(st.none(), content_types))
    if ct == "application/json" and draw(st.booleans()):
        body = json.dumps(draw(json_values), ensure_ascii=draw(st.booleans())).encode()
    else:
        body = draw(st.binary(max_size=80))
    return ([] if ct is None else [("content-type", ct)]), body


def typed(value: Any) -> Any:
    if isinstance(value, dict):
        return [(k, typed(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def same_body(got: bytes, sent: bytes, ct: str | None) -> bool:
    if got == sent:
        return True
    return ct == "application/json" and typed(json.loads(got)) == typed(json.loads(sent))


@SETTINGS
@given(
    st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    targets(),
    headers(response=False),
    bodies(),
    st.booleans(),
)
def test_arbitrary_requests_round_trip(
    method: str,
    target: bytes,
    hdrs: list[tuple[str, str]],
    body: tuple[list[tuple[str, str]], bytes],
    use_tokens: bool,
) -> None:
    ct_headers, payload = body
    req = HttpRequest(method, target, ct_headers + hdrs, payload)
    sender = SenderTokens() if use_tokens else None
    receiver = ReceiverTokens() if use_tokens else None
    for _ in range(2):  # second time: the binding is acknowledged
        msg = CODEC.encode_request(req, sender)
        wire = encode_coap(msg, token=b"\x01\x02")
        back = CODEC.decode_request(decode_coap(wire)[3], receiver)
        assert back.method == req.method
        assert back.target == req.target
        assert back.headers == significant_headers(req.headers)
        assert same_body(back.body, req.body, back.header("content-type"))
        for opt in msg.get(n.URI_PATH) + msg.get(n.URI_QUERY):
            opt.decode("utf-8")
            assert len(opt) <= 255
        if sender is not None:
            sender.acknowledge(msg)


@SETTINGS
@given(st.integers(100, 599), headers(response=True), bodies(), st.booleans())
def test_arbitrary_responses_round_trip(
    status: int,
    hdrs: list[tuple[str, str]],
    body: tuple[list[tuple[str, str]], bytes],
    want_json: bool,
) -> None:
    ct_headers, payload = body
    resp = HttpResponse(status, ct_headers + hdrs, payload)
    msg = CODEC.encode_response(resp, want_json=want_json)
    back = CODEC.decode_response(decode_coap(encode_coap(msg, mtype=2))[3])
    assert back.status == status
    assert back.headers == significant_headers(resp.headers)
    assert same_body(back.body, resp.body, back.header("content-type"))
    if want_json and resp.header("content-type") == "application/json" and len(ct_headers) == 1:
        assert msg.payload == payload


interesting_options = st.sampled_from(
    [
        n.URI_PATH,
        n.URI_QUERY,
        n.CONTENT_FORMAT,
        n.MAX_AGE,
        n.ETAG,
        n.ACCEPT,
        *n.PRIVATE_OPTIONS,
        65100,
        9,
    ]
)


@SETTINGS
@given(
    st.integers(0, 255),
    st.lists(st.builds(CoapOption, interesting_options, st.binary(max_size=40)), max_size=6),
    st.binary(max_size=60),
)
def test_any_message_decodes_or_raises_remote_protocol_error(
    code: int, options: list[CoapOption], payload: bytes
) -> None:
    msg = CoapMessage(code, tuple(sorted(options, key=lambda o: o.number)), payload)
    for decode in (
        lambda: CODEC.decode_request(msg),
        lambda: CODEC.decode_request(msg, ReceiverTokens()),
        lambda: CODEC.decode_response(msg),
    ):
        try:
            decode()
        except RemoteProtocolError:
            pass
    CODEC.route_name(msg)


@SETTINGS
@given(st.binary(max_size=200))
def test_any_datagram_decodes_or_raises_remote_protocol_error(data: bytes) -> None:
    try:
        msg = decode_coap(data)[3]
        CODEC.decode_request(msg)
    except RemoteProtocolError:
        pass
    try:
        msg = decode_coap(data)[3]
        CODEC.decode_response(msg)
    except RemoteProtocolError:
        pass
