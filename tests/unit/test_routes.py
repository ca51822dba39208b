"""The route table: coverage of Synapse's servlets, exact round trips, compression."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.messages import HttpRequest
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile
from synapse_coap.wire.routes import ID_ALPHABET, RouteTable, decode_arg, encode_arg

ROOT = Path(__file__).resolve().parents[2]
ROUTES_JSON = ROOT / "maps" / "profile-1" / "routes.json"
CTX = WireContext(("example.org", "other.example"))


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable.from_json(json.loads(ROUTES_JSON.read_text()))


def _gen_routes() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(
        "gen_routes", str(ROOT / "scripts" / "gen-routes")
    )
    spec = importlib.util.spec_from_loader("gen_routes", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_every_endpoint_synapse_serves_has_a_route() -> None:
    """Cross-check against Synapse's own servlet registrations (the installed version)."""
    gen = _gen_routes()
    found = gen.synapse_templates()
    have = {gen.shape(r["template"]) for r in json.loads(ROUTES_JSON.read_text())["routes"]}
    missing = sorted(t for t in found if gen.shape(t) not in have)
    assert not missing, f"routes.json lacks {missing[:10]}; run scripts/gen-routes"
    # The scan really saw the main APIs (guards against an empty scan passing).
    for t in (
        "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}",
        "/_matrix/federation/v1/send/{transaction_id}",
        "/_matrix/federation/v2/send_join/{room_id}/{event_id}",
        "/_matrix/key/v2/server",
        "/_matrix/media/v3/upload",
        "/_matrix/client/v1/media/download/{server_name}/{media_id}",
        "/_matrix/federation/v1/media/download/{media_id}",
        "/_matrix/client/r0/sync",
        "/_matrix/client/api/v1/rooms/{room_id}/messages",
        "/.well-known/matrix/server",
    ):
        assert t in found


def test_route_ids_are_valid_unique_and_frequent_ones_short(table: RouteTable) -> None:
    ids = [r.id for r in table.routes]
    assert len(ids) == len(set(ids))
    assert len({r.name for r in table.routes}) == len(ids)
    for rid in ids:
        assert rid[0] not in "_." and all(c in ID_ALPHABET for c in rid)
        assert 1 <= len(rid) <= 2
    by_template = {r.template: r.id for r in table.routes}
    for template in (
        "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}",
        "/_matrix/client/v3/sync",
        "/_matrix/client/v3/rooms/{room_id}/state/{event_type}/{state_key}",
        "/_matrix/client/v3/rooms/{room_id}/receipt/{receipt_type}/{event_id}",
        "/_matrix/client/v3/rooms/{room_id}/typing/{user_id}",
        "/_matrix/federation/v1/send/{transaction_id}",
        "/_matrix/federation/v1/make_join/{room_id}/{user_id}",
        "/_matrix/federation/v2/send_join/{room_id}/{event_id}",
        "/_matrix/key/v2/server",
        "/_matrix/client/v3/profile/{user_id}",
        "/_matrix/client/versions",
        "/_matrix/client/v3/login",
        "/_matrix/media/v3/upload",
        "/_matrix/media/v3/download/{server_name}/{media_id}",
    ):
        assert len(by_template[template]) == 1, template


def test_gen_routes_keeps_existing_ids(table: RouteTable) -> None:
    gen = _gen_routes()
    existing = json.loads(ROUTES_JSON.read_text())
    rebuilt = gen.build(existing, {"/_matrix/client/v9/brand_new": {"GET"}})
    old = {r["template"]: r["id"] for r in existing["routes"]}
    new = {r["template"]: r["id"] for r in rebuilt["routes"]}
    assert all(new[t] == i for t, i in old.items())
    assert new["/_matrix/client/v9/brand_new"] not in old.values()


def _sample_value(name: str) -> str:
    return {
        "room_id": "!abcdefghijklmnopqr:example.org",
        "room_identifier": "#lobby:other.example",
        "event_id": "$Jq3n0d9sk1LQ1m7ZcWqK3yH2q3mZlq8uKt1Zq0a7_-Q",
        "parent_id": "$Jq3n0d9sk1LQ1m7ZcWqK3yH2q3mZlq8uKt1Zq0a7_-Q",
        "user_id": "@alice:example.org",
        "target_user_id": "@bob:remote.test",
        "txn_id": "m1700000000000.12",
        "transaction_id": "1700000000000",
        "event_type": "m.room.message",
        "server_name": "example.org",
        "media_id": "AbCdEfGhIjKlMnOpQrStUvWx",
        "path": "global/override/.m.rule.master",
        "state_key": "",
    }.get(name, "x y/é")


def test_every_route_round_trips_with_each_percent_style(table: RouteTable) -> None:
    styles = [
        lambda v: quote(v, safe=""),
        lambda v: v.replace("/", "%2F").replace(" ", "%20").replace("é", "%C3%A9"),
        lambda v: quote(v, safe="!'()*"),
    ]
    for route in table.routes:
        for style in styles:
            parts = [""]
            for seg in route.segments:
                if isinstance(seg, str):
                    parts.append(seg)
                elif seg.tail:
                    parts.append(_sample_value(seg.name))
                else:
                    parts.append(style(_sample_value(seg.name)))
            path = "/".join(parts).encode()
            segs = table.encode_target("GET", path, CTX)
            assert segs is not None, path
            assert table.decode_path("GET", segs, CTX) == path
            for s in segs:
                assert len(s.encode()) <= 255
                s.encode("utf-8")


def test_send_path_is_compact(table: RouteTable) -> None:
    path = b"/_matrix/client/v3/rooms/!abcdefghijklmnopqr:example.org/send/m.room.message/m1700000000000.12"
    segs = table.encode_target("PUT", path, CTX)
    assert segs is not None
    assert segs[0] == "s!"  # route id + "not escaped" style
    assert segs[2] == "\x12"  # m.room.message: one byte
    assert sum(len(s.encode()) for s in segs) <= 30
    assert table.route_name(segs) == "client.v3.rooms._.send.3"


def test_unknown_or_unreproducible_paths_give_none(table: RouteTable) -> None:
    assert table.encode_target("GET", b"/_matrix/nope", CTX) is None
    assert table.encode_target("GET", b"/_synapse/admin/v1/users", CTX) is None
    # lower-case hex escapes: no style reproduces them
    assert table.encode_target("GET", b"/_matrix/client/v3/rooms/%21a%3ab/members", CTX) is None
    # invalid UTF-8 in an escape
    assert table.encode_target("GET", b"/_matrix/client/v3/rooms/%FF/members", CTX) is None
    assert (
        table.encode_target("GET", b"/_matrix/client/v3/rooms/" + b"a" * 300 + b"/members", CTX)
        is None
    )


@pytest.mark.parametrize(
    "segments",
    [
        [],
        ["zz"],
        ["s"],
        ["s", "a", "b"],
        ["s", "\x11\x09", "\x12", "x"],
        ["s", "\x1f\x7f", "\x12", "x"],
        ["s", "\x03\xc3\xa9", "\x12", "x"],
        ["v", "extra"],
    ],
)
def test_bad_route_segments_raise(table: RouteTable, segments: list[str]) -> None:
    with pytest.raises(RemoteProtocolError):
        table.decode_path("GET", segments, CTX)


ids = st.text(alphabet="!@$#abcXYZ019:._-~ é\x00\x01\x1f/%", max_size=40)


@settings(max_examples=300, deadline=None)
@given(ids, st.sampled_from(["room", "event", "user", "alias", "txn", "enum", "server", "str"]))
def test_argument_compression_is_exact(value: str, kind: str) -> None:
    enums = ["m.room.message", "m.read"]
    encoded = encode_arg(value, kind, CTX, enums)
    assert decode_arg(encoded, kind, CTX, enums) == value
    assert len(encoded.encode()) <= len(value.encode()) + 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.sampled_from(["room", "event", "txn"]))
def test_any_argument_text_decodes_or_raises(text: str, kind: str) -> None:
    try:
        decode_arg(text, kind, CTX, ["m.read"])
    except RemoteProtocolError:
        pass


def test_route_table_rejects_bad_ids() -> None:
    from synapse_coap.errors import LocalProtocolError

    for bad in ("_x", ".w", "", "a/b"):
        with pytest.raises(LocalProtocolError):
            RouteTable.from_json({"routes": [{"id": bad, "template": "/x"}]})


def test_templates_expand_regex_alternatives() -> None:
    gen = _gen_routes()
    got = gen.templates_of(r"^/_matrix/x/(r0|v3)/a/(?P<room_id>[^/]*)(/(?P<k>[^/]*))?/?$")
    assert set(got) == {
        "/_matrix/x/r0/a/{room_id}/{k}",
        "/_matrix/x/r0/a/{room_id}/{k}/",
        "/_matrix/x/r0/a/{room_id}",
        "/_matrix/x/r0/a/{room_id}/",
        "/_matrix/x/v3/a/{room_id}/{k}",
        "/_matrix/x/v3/a/{room_id}/{k}/",
        "/_matrix/x/v3/a/{room_id}",
        "/_matrix/x/v3/a/{room_id}/",
    }
    assert gen.templates_of(r"^/_matrix/c/(?P<path>pushrules/.*)$") == [
        "/_matrix/c/pushrules/{path*}"
    ]
    assert gen.shape("/a/{room_id}/{p*}") == "/a/{}/{*}"


@pytest.mark.parametrize(
    ("target", "name"),
    [
        (b"/_matrix/federation/v1/send/1700000000123", "federation.v1.send.1"),
        (b"/_matrix/key/v2/server", "key.v2.server.0"),
        (b"/_matrix/federation/v1/query/profile?user_id=%40b%3Aexample.org", "federation.v1.query"),
        (b"/_matrix/client/v3/rooms/%21r%3Aexample.org/send/m.room.message/t1", None),
        (b"/_matrix/federation/v1/no_such_endpoint", "literal"),
        (b"/_matrix/federation/v1/send/1?\xff", "literal"),  # a query that is not UTF-8
        (b"", "literal"),
    ],
)
def test_codec_names_a_target_as_its_receiver_does(target: bytes, name: str | None) -> None:
    codec = WireCodec(load_profile(1), CTX)
    got = codec.route_name_for_target(target)
    received = codec.route_name(codec.encode_request(HttpRequest("PUT", target, (), b"{}")))
    assert got == received
    if name is not None:
        assert got == name
    assert "example.org" not in got and "1700000000123" not in got
