"""Helpers shared by the sidecar and the gateway: timeouts, redaction, addresses, cache policy."""

from __future__ import annotations

import pytest

from synapse_coap.errors import ConfigValueError
from synapse_coap.proxy.cache import max_age
from synapse_coap.proxy.common import (
    DUMP_ENV,
    dump_enabled,
    matrix_error,
    parse_host_port,
    redact_headers,
    redact_target,
    request_timeout,
)


def test_request_timeout() -> None:
    assert request_timeout(b"/_matrix/client/v3/sync?timeout=30000", 60, 10) == 60
    assert request_timeout(b"/_matrix/client/v3/sync?timeout=90000", 60, 10) == 100
    assert request_timeout(b"/_matrix/client/v3/sync?timeout=-5", 60, 10) == 60
    assert request_timeout(b"/_matrix/client/v3/sync?timeout=nan", 60, 10) == 60
    assert request_timeout(b"/_matrix/client/v3/sync", 60, 10) == 60


def test_redaction() -> None:
    assert redact_target(b"/a?x=1&access_token=SECRET&y=2") == "/a?x=1&access_token=<redacted>&y=2"
    assert redact_target(b"/login?loginToken=SECRET") == "/login?loginToken=<redacted>"
    assert redact_headers([("authorization", "Bearer S"), ("content-type", "a")]) == [
        ("authorization", "<redacted>"),
        ("content-type", "a"),
    ]


def test_dump_switch_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DUMP_ENV, raising=False)
    assert not dump_enabled(False)
    assert dump_enabled(True)
    monkeypatch.setenv(DUMP_ENV, "1")
    assert dump_enabled(False)
    monkeypatch.setenv(DUMP_ENV, "0")
    assert not dump_enabled(False)


def test_matrix_error_body() -> None:
    resp = matrix_error(502, "M_UNKNOWN", "down")
    assert resp.status == 502
    assert resp.body == b'{"errcode": "M_UNKNOWN", "error": "down"}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8008", ("127.0.0.1", 8008)),
        ("[::]:5683", ("::", 5683)),
        ("[::1]", ("::1", 5683)),
        ("hs.example", ("hs.example", 5683)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, "--listen", default_port=5683) == expected


@pytest.mark.parametrize("text", ["::1:80", "[::1", "host:99999", "host:x", ":80"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        parse_host_port(text, "--listen")
    assert info.value.path == "--listen"


def test_max_age() -> None:
    assert max_age(None) is None
    assert max_age("public, max-age=600, s-maxage=3600") == 600
    assert max_age("public,max-age=86400,s-maxage=0,proxy-revalidate") == 86400
    assert max_age("no-cache, no-store, must-revalidate") == 0
    assert max_age("private") is None
