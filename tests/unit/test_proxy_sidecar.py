"""The sidecar's translation, error mapping, caching and log hygiene, with a fake CoAP client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from synapse_coap.errors import (
    KeyChangedError,
    LinkDown,
    LocalProtocolError,
    RemoteProtocolError,
    RequestTimeout,
)
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions

TOKEN = "syt_c2VjcmV0_SECRETTOKENVALUE_0a1b2c"
BODY = b'{"msgtype":"m.text","body":"the quick brown fox PAYLOADMARKER"}'


class FakeClient:
    """Records requests; answers with ``respond(request)`` (a response or an exception)."""

    def __init__(self, respond: Callable[[HttpRequest], Any] | None = None) -> None:
        self.calls: list[tuple[Any, HttpRequest, float | None]] = []
        self.respond = respond or (
            lambda r: HttpResponse(200, (("content-type", "application/json"),), b"{}")
        )
        self.gate: asyncio.Event | None = None

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.calls.append((endpoint, request, timeout))
        if self.gate is not None:
            await self.gate.wait()
        result = self.respond(request)
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, HttpResponse)
        return result


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def auth(token: str = TOKEN) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


# -- translation ------------------------------------------------------------------------------


def test_translate_keeps_exact_target_and_drops_connection_headers() -> None:
    target = b"/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/txn%2F1?b=2&a=1"
    req = Sidecar.translate_request(
        "put",
        target,
        [
            auth(),
            ("content-type", "application/json"),
            ("host", "localhost:8008"),
            ("connection", "keep-alive"),
            ("content-length", str(len(BODY))),
            ("user-agent", "nio"),
            ("accept-encoding", "gzip"),
        ],
        BODY,
    )
    assert req is not None
    assert req.method == "PUT"
    assert req.target == target
    assert req.body == BODY
    assert dict(req.headers) == {
        "authorization": f"Bearer {TOKEN}",
        "content-type": "application/json",
    }


def test_translate_forwards_well_known_and_refuses_other_paths() -> None:
    assert Sidecar.translate_request("GET", b"/.well-known/matrix/client", [], b"") is not None
    assert Sidecar.translate_request("GET", b"/_synapse/client/pick_username", [], b"") is not None
    assert Sidecar.translate_request("GET", b"/index.html", [], b"") is None
    assert Sidecar.translate_request("GET", b"/_matrixx/foo", [], b"") is None


def test_query_access_token_moves_into_authorization_header() -> None:
    req = Sidecar.translate_request(
        "GET", b"/_matrix/client/v3/sync?since=s1&access_token=abc%2Bdef&timeout=0", [], b""
    )
    assert req is not None
    assert req.target == b"/_matrix/client/v3/sync?since=s1&timeout=0"
    assert req.header("authorization") == "Bearer abc+def"
    only = Sidecar.translate_request("GET", b"/_matrix/client/v3/sync?access_token=x", [], b"")
    assert only is not None and only.target == b"/_matrix/client/v3/sync"


def test_header_token_wins_over_query_token() -> None:
    req = Sidecar.translate_request(
        "GET", b"/_matrix/client/v3/sync?access_token=q", [auth("h")], b""
    )
    assert req is not None
    assert req.header("authorization") == "Bearer h"
    assert b"access_token" not in req.target


def test_forward_passes_request_and_response_through_unchanged() -> None:
    media = bytes(range(256)) * 40
    response = HttpResponse(
        200,
        (("content-type", "image/png"), ("content-disposition", "inline; filename=a.png")),
        media,
    )
    client = FakeClient(lambda r: response)
    sidecar = Sidecar(client, "ENDPOINT", options=SidecarOptions(cache=False))
    req = HttpRequest("GET", b"/_matrix/client/v1/media/download/hs/abc", (auth(),))
    got = run(sidecar.forward(req))
    assert got == response
    endpoint, sent, timeout = client.calls[0]
    assert endpoint == "ENDPOINT"
    assert sent == req
    assert timeout == 120.0


def test_long_poll_timeout_comes_from_the_query() -> None:
    client = FakeClient()
    sidecar = Sidecar(
        client, None, options=SidecarOptions(request_timeout=20.0, long_poll_slack=15.0)
    )
    run(sidecar.forward(HttpRequest("GET", b"/_matrix/client/v3/sync?since=x&timeout=300000")))
    run(sidecar.forward(HttpRequest("GET", b"/_matrix/client/v3/sync?timeout=0")))
    run(sidecar.forward(HttpRequest("GET", b"/_matrix/client/v3/sync?timeout=bogus")))
    assert [c[2] for c in client.calls] == [315.0, 20.0, 20.0]


# -- errors a client understands ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (LinkDown("no session"), 502),
        (RequestTimeout("gave up"), 504),
        (KeyChangedError("hs.example", "fpA", "fpB"), 502),
        (RemoteProtocolError("garbled"), 502),
        (LocalProtocolError("too big"), 500),
        (RuntimeError("bug"), 500),
    ],
)
def test_transport_errors_become_matrix_json_errors(error: BaseException, status: int) -> None:
    sidecar = Sidecar(FakeClient(lambda r: error), None, options=SidecarOptions(cache=False))
    got = run(sidecar.forward(HttpRequest("GET", b"/_matrix/client/v3/sync")))
    assert got.status == status
    assert got.header("content-type") == "application/json"
    body = json.loads(got.body)
    assert body["errcode"] == "M_UNKNOWN"
    assert isinstance(body["error"], str) and body["error"]


def test_key_change_error_tells_the_user_which_keys() -> None:
    err = KeyChangedError("hs.example", "fpA", "fpB")
    sidecar = Sidecar(FakeClient(lambda r: err), None, options=SidecarOptions(cache=False))
    got = run(sidecar.forward(HttpRequest("GET", b"/_matrix/client/versions")))
    text = json.loads(got.body)["error"]
    assert "fpA" in text and "fpB" in text and "hs.example" in text


# -- the cache ---------------------------------------------------------------------------------


def versions_response(cache_control: str = "public, max-age=600") -> HttpResponse:
    return HttpResponse(
        200,
        (("content-type", "application/json"), ("cache-control", cache_control)),
        b'{"versions":["v1.11"]}',
    )


def test_cacheable_get_is_answered_locally_until_max_age() -> None:
    clock = Clock()
    client = FakeClient(lambda r: versions_response("public, max-age=600"))
    sidecar = Sidecar(client, None, clock=clock)
    req = HttpRequest("GET", b"/_matrix/client/versions")
    first = run(sidecar.forward(req))
    clock.now += 599
    second = run(sidecar.forward(req))
    assert len(client.calls) == 1
    assert second.body == first.body
    assert second.header("age") == "599"
    clock.now += 2
    run(sidecar.forward(req))
    assert len(client.calls) == 2


def test_cache_is_keyed_per_access_token() -> None:
    client = FakeClient(
        lambda r: HttpResponse(
            200, (("cache-control", "max-age=60"),), (r.header("authorization") or "").encode()
        )
    )
    sidecar = Sidecar(client, None, clock=Clock())
    path = b"/_matrix/client/v3/profile/%40a%3Ahs"
    a = run(sidecar.forward(HttpRequest("GET", path, (auth("tokA"),))))
    b = run(sidecar.forward(HttpRequest("GET", path, (auth("tokB"),))))
    a2 = run(sidecar.forward(HttpRequest("GET", path, (auth("tokA"),))))
    assert a.body == b"Bearer tokA" and b.body == b"Bearer tokB" and a2.body == b"Bearer tokA"
    assert len(client.calls) == 2


def test_no_store_is_respected_except_for_slowly_changing_routes() -> None:
    nostore = "no-cache, no-store, must-revalidate"
    client = FakeClient(lambda r: versions_response(nostore))
    sidecar = Sidecar(client, None, clock=Clock())
    sync = HttpRequest("GET", b"/_matrix/client/v3/sync", (auth(),))
    caps = HttpRequest("GET", b"/_matrix/client/v3/capabilities", (auth(),))
    for _ in range(2):
        run(sidecar.forward(sync))
        run(sidecar.forward(caps))
    paths = [c[1].target for c in client.calls]
    assert paths.count(sync.target) == 2
    assert paths.count(caps.target) == 1


def test_errors_and_non_get_are_not_cached() -> None:
    client = FakeClient(lambda r: HttpResponse(404, (("cache-control", "max-age=60"),), b"{}"))
    sidecar = Sidecar(client, None, clock=Clock())
    for _ in range(2):
        run(sidecar.forward(HttpRequest("GET", b"/_matrix/client/versions")))
        run(sidecar.forward(HttpRequest("POST", b"/_matrix/client/versions", body=b"{}")))
    assert len(client.calls) == 4


def test_own_profile_change_invalidates_cached_profile() -> None:
    names = iter([b'{"displayname":"old"}', b"{}", b'{"displayname":"new"}'])
    client = FakeClient(
        lambda r: HttpResponse(200, (("content-type", "application/json"),), next(names))
    )
    sidecar = Sidecar(client, None, clock=Clock())
    get = HttpRequest("GET", b"/_matrix/client/v3/profile/%40a%3Ahs", (auth(),))
    assert run(sidecar.forward(get)).body == b'{"displayname":"old"}'
    put = HttpRequest(
        "PUT",
        b"/_matrix/client/v3/profile/%40a%3Ahs/displayname",
        (auth(),),
        b'{"displayname":"new"}',
    )
    run(sidecar.forward(put))
    assert run(sidecar.forward(get)).body == b'{"displayname":"new"}'


def test_cache_bounds_evict_least_recently_used() -> None:
    from synapse_coap.proxy.cache import ResponseCache

    clock = Clock()
    cache = ResponseCache(clock, max_entries=2, max_bytes=10_000)
    reqs = [
        HttpRequest("GET", f"/_matrix/client/v1/media/thumbnail/hs/{i}".encode()) for i in range(3)
    ]
    resp = HttpResponse(200, (("cache-control", "max-age=100"),), b"x" * 100)
    cache.store(reqs[0], resp)
    cache.store(reqs[1], resp)
    assert cache.lookup(reqs[0]) is not None  # 0 is now most recent
    cache.store(reqs[2], resp)
    assert cache.lookup(reqs[1]) is None
    assert cache.lookup(reqs[0]) is not None and cache.lookup(reqs[2]) is not None
    assert cache.size_bytes == 200
    big = HttpResponse(200, (("cache-control", "max-age=100"),), b"x" * 9_950)
    cache.store(reqs[1], big)
    assert len(cache) == 1 and cache.size_bytes == 9_950


def test_concurrent_identical_gets_share_one_link_request() -> None:
    client = FakeClient(lambda r: versions_response("no-store"))

    async def scenario() -> list[HttpResponse]:
        client.gate = asyncio.Event()
        sidecar = Sidecar(client, None, clock=Clock())
        req = HttpRequest("GET", b"/_matrix/client/v3/pushrules/", (auth(),))
        tasks = [asyncio.ensure_future(sidecar.forward(req)) for _ in range(5)]
        await asyncio.sleep(0)
        client.gate.set()
        return list(await asyncio.gather(*tasks))

    results = run(scenario())
    assert len(client.calls) == 1
    assert all(r.status == 200 for r in results)


def test_concurrent_different_requests_are_all_in_flight_at_once() -> None:
    client = FakeClient()

    async def scenario() -> int:
        client.gate = asyncio.Event()
        sidecar = Sidecar(client, None, options=SidecarOptions(cache=False))
        tasks = [
            asyncio.ensure_future(
                sidecar.forward(
                    HttpRequest("PUT", f"/_matrix/client/v3/x/{i}".encode(), body=b"{}")
                )
            )
            for i in range(8)
        ]
        for _ in range(3):
            await asyncio.sleep(0)
        inflight = sidecar.inflight
        client.gate.set()
        await asyncio.gather(*tasks)
        return inflight

    assert run(scenario()) == 8


# -- shutdown ----------------------------------------------------------------------------------


def test_drain_fails_unfinished_requests_with_503_and_refuses_new_ones() -> None:
    client = FakeClient()

    async def scenario() -> tuple[HttpResponse, HttpResponse, int]:
        client.gate = asyncio.Event()  # never set: the homeserver never answers
        sidecar = Sidecar(client, None, options=SidecarOptions(cache=False, shutdown_grace=0.0))
        task = asyncio.ensure_future(
            sidecar.forward(HttpRequest("GET", b"/_matrix/client/v3/sync?timeout=30000"))
        )
        while not client.calls:
            await asyncio.sleep(0)
        await sidecar.drain()
        failed = await task
        late = await sidecar.forward(HttpRequest("GET", b"/_matrix/client/versions"))
        return failed, late, len(client.calls)

    failed, late, calls = run(scenario())
    assert failed.status == 503 and json.loads(failed.body)["errcode"] == "M_UNKNOWN"
    assert late.status == 503
    assert calls == 1


def test_client_going_away_cancels_the_link_request() -> None:
    client = FakeClient()

    async def scenario() -> bool:
        client.gate = asyncio.Event()
        sidecar = Sidecar(client, None, options=SidecarOptions(cache=False, rejoin_grace=0))
        task = asyncio.ensure_future(
            sidecar.forward(HttpRequest("GET", b"/_matrix/client/v3/sync"))
        )
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        inner = next(iter(sidecar._inflight))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        return inner.cancelled()

    assert run(scenario())


# -- log hygiene -------------------------------------------------------------------------------


def _exercise(sidecar: Sidecar) -> None:
    reqs = [
        Sidecar.translate_request(
            "PUT",
            b"/_matrix/client/v3/rooms/%21r%3Ahs/send/m.room.message/t1",
            [auth(), ("content-type", "application/json")],
            BODY,
        ),
        Sidecar.translate_request(
            "GET", f"/_matrix/client/v3/sync?access_token={TOKEN}".encode(), [], b""
        ),
    ]
    for req in reqs:
        assert req is not None
        run(sidecar.forward(req))


def test_logs_carry_neither_tokens_nor_bodies(caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient(lambda r: HttpResponse(200, (), b'{"event_id":"$RESPONSEMARKER"}'))
    caplog.set_level(logging.DEBUG)
    _exercise(Sidecar(client, None, options=SidecarOptions(cache=False)))
    failing = Sidecar(FakeClient(lambda r: LinkDown("x")), None)
    _exercise(failing)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/_matrix/client/v3/sync" in text  # something was logged
    assert TOKEN not in text
    assert "PAYLOADMARKER" not in text
    assert "RESPONSEMARKER" not in text


def test_payload_dump_logs_bodies_with_sizes_but_still_no_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient(lambda r: HttpResponse(200, (), b'{"event_id":"$RESPONSEMARKER"}'))
    caplog.set_level(logging.DEBUG)
    _exercise(Sidecar(client, None, options=SidecarOptions(cache=False, dump_payloads=True)))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "PAYLOADMARKER" in text and "RESPONSEMARKER" in text
    assert f"body({len(BODY)} B)" in text
    assert TOKEN not in text
