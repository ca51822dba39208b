"""The gateway's HTTP side (HttpDispatcher) against a real aiohttp upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest
from synapse_coap.proxy.gateway import HttpDispatcher

pytestmark = pytest.mark.integration

PEER = PeerInfo("127.0.0.9", 40000, static_key=b"k" * 32, secure=True)
XMATRIX = 'X-Matrix origin="a.test",destination="b.test",key="ed25519:a1",sig="c2lnbmF0dXJl"'


@asynccontextmanager
async def upstream(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_exact_target_headers_and_body_are_forwarded() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        return web.Response(
            status=201,
            body=b'{"ok":true}',
            headers={
                "Content-Type": "application/json",
                "Access-Control-Allow-Origin": "*",
                "Cache-Control": "no-store",
            },
        )

    target = b"/_matrix/federation/v1/send/txn%2F1?b=%F0%9F%98%80&a=1&a=2"

    async def scenario() -> Any:
        async with upstream(handler) as url:
            d = HttpDispatcher(url)
            try:
                return await d.dispatch(
                    HttpRequest(
                        "PUT",
                        target,
                        (
                            ("authorization", XMATRIX),
                            ("content-type", "application/json"),
                            ("x-forwarded-for", "6.6.6.6"),
                        ),
                        b'{"pdus":[]}',
                    ),
                    PEER,
                )
            finally:
                await d.close()

    resp = asyncio.run(scenario())
    assert resp.status == 201
    assert resp.body == b'{"ok":true}'
    assert resp.header("cache-control") == "no-store"
    assert resp.header("access-control-allow-origin") is None
    assert resp.header("content-length") is None
    (req,) = seen
    assert req["method"] == "PUT"
    assert req["raw_path"] == target.decode()
    assert req["headers"]["Authorization"] == XMATRIX
    assert req["headers"]["X-Forwarded-For"] == "127.0.0.9"
    assert req["body"] == b'{"pdus":[]}'


def test_binary_media_round_trips() -> None:
    blob = bytes(range(256)) * 4000

    async def handler(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(body=data[::-1], content_type="image/png")

    async def scenario() -> Any:
        async with upstream(handler) as url:
            d = HttpDispatcher(url)
            try:
                return await d.dispatch(
                    HttpRequest(
                        "POST",
                        b"/_matrix/media/v3/upload?filename=a.png",
                        (("content-type", "image/png"),),
                        blob,
                    ),
                    PEER,
                )
            finally:
                await d.close()

    resp = asyncio.run(scenario())
    assert resp.status == 200
    assert resp.body == blob[::-1]
    assert resp.header("content-type") == "image/png"


def test_unreachable_upstream_is_502_matrix_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def scenario() -> Any:
        d = HttpDispatcher(f"http://127.0.0.1:{port}")
        try:
            return await d.dispatch(HttpRequest("GET", b"/_matrix/client/versions"), PEER)
        finally:
            await d.close()

    resp = asyncio.run(scenario())
    assert resp.status == 502
    assert json.loads(resp.body)["errcode"] == "M_UNKNOWN"


def test_slow_upstream_is_504_matrix_error() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def scenario() -> Any:
        async with upstream(handler) as url:
            d = HttpDispatcher(url, request_timeout=0.2, long_poll_slack=0.0)
            try:
                return await d.dispatch(HttpRequest("GET", b"/_matrix/client/v3/sync"), PEER)
            finally:
                release.set()
                await d.close()

    resp = asyncio.run(scenario())
    assert resp.status == 504
    assert json.loads(resp.body)["errcode"] == "M_UNKNOWN"


def test_gateway_logs_carry_neither_tokens_nor_bodies(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=b'{"access_token":"RESPONSETOKEN"}', content_type="application/json"
        )

    async def scenario(dump: bool) -> None:
        async with upstream(handler) as url:
            d = HttpDispatcher(url, dump_payloads=dump)
            try:
                await d.dispatch(
                    HttpRequest(
                        "POST",
                        b"/_matrix/client/v3/login?access_token=QUERYTOKEN",
                        (("authorization", "Bearer HEADERTOKEN"),),
                        b'{"password":"BODYSECRET"}',
                    ),
                    PEER,
                )
            finally:
                await d.close()

    caplog.set_level(logging.DEBUG)
    asyncio.run(scenario(False))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/_matrix/client/v3/login" in text
    for secret in ("QUERYTOKEN", "HEADERTOKEN", "BODYSECRET", "RESPONSETOKEN"):
        assert secret not in text
    caplog.clear()
    asyncio.run(scenario(True))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "BODYSECRET" in text and "RESPONSETOKEN" in text  # the dump shows bodies...
    assert "QUERYTOKEN" not in text and "HEADERTOKEN" not in text  # ...but never credentials
