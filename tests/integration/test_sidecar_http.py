"""The sidecar's HTTP side on a real loopback socket, with a fake CoAP client behind it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from synapse_coap.errors import LinkDown
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self, response: HttpResponse | Exception) -> None:
        self.response = response
        self.requests: list[HttpRequest] = []

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.requests.append(request)
        if isinstance(self.response, Exception):
            raise self.response
        return self.response


async def serve(client: Recorder, options: SidecarOptions, fn: Any) -> Any:
    sidecar = Sidecar(client, None, options=options)
    runner = web.AppRunner(sidecar.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            return await fn(http, f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()


def test_raw_target_body_and_response_pass_through_http() -> None:
    media = bytes(range(256)) * 100
    rec = Recorder(
        HttpResponse(
            200,
            (("content-type", "image/png"), ("etag", '"x"'), ("content-length", "999")),
            media,
        )
    )
    target = "/_matrix/media/v3/upload?filename=a%20b.png&x=%E2%9C%93"

    async def fn(http: aiohttp.ClientSession, base: str) -> tuple[int, Any, bytes]:
        async with http.post(
            aiohttp.client.URL(base + target, encoded=True),
            data=media,
            headers={"Content-Type": "image/png", "Authorization": "Bearer T", "User-Agent": "x"},
        ) as r:
            return r.status, r.headers.copy(), await r.read()

    status, headers, body = asyncio.run(serve(rec, SidecarOptions(), fn))
    assert status == 200 and body == media
    assert headers["Content-Type"] == "image/png"
    assert headers["ETag"] == '"x"'
    assert headers["Content-Length"] == str(len(media))
    assert headers["Access-Control-Allow-Origin"] == "*"
    (req,) = rec.requests
    assert req.method == "POST"
    assert req.target == target.encode()
    assert req.body == media
    assert dict(req.headers) == {"content-type": "image/png", "authorization": "Bearer T"}


def test_cors_preflight_is_answered_locally() -> None:
    rec = Recorder(HttpResponse(200))

    async def fn(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, str]]:
        async with http.options(
            base + "/_matrix/client/v3/login",
            headers={"Origin": "http://localhost", "Access-Control-Request-Method": "POST"},
        ) as r:
            return r.status, dict(r.headers)

    status, headers = asyncio.run(serve(rec, SidecarOptions(), fn))
    assert status == 204
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert rec.requests == []


def test_local_errors_are_matrix_json() -> None:
    rec = Recorder(LinkDown("no session to 127.0.0.1:5683"))

    async def fn(http: aiohttp.ClientSession, base: str) -> list[tuple[int, Any]]:
        out = []
        for method, path, data in (
            ("GET", "/index.html", None),
            ("GET", "/_matrix/client/v3/sync", None),
            ("POST", "/_matrix/media/v3/upload", b"x" * 2048),
        ):
            async with http.request(method, base + path, data=data) as r:
                out.append((r.status, json.loads(await r.read())))
        return out

    results = asyncio.run(serve(rec, SidecarOptions(max_body_size=1024), fn))
    assert [s for s, _ in results] == [404, 502, 413]
    assert [b["errcode"] for _, b in results] == ["M_UNRECOGNIZED", "M_UNKNOWN", "M_TOO_LARGE"]
    assert "127.0.0.1:5683" in results[1][1]["error"]
    assert len(rec.requests) == 1
