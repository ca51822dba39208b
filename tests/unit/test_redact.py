"""synapse_coap.mapping.redact: credentials never reach a log line."""

from __future__ import annotations

from synapse_coap.mapping.redact import redact_headers, redact_target
from synapse_coap.proxy import common


def test_access_token_query_value_is_redacted() -> None:
    out = redact_target(b"/_matrix/client/v3/sync?timeout=0&access_token=syt_SECRET&since=s1")
    assert "syt_SECRET" not in out
    assert out == "/_matrix/client/v3/sync?timeout=0&access_token=<redacted>&since=s1"


def test_percent_encoded_name_and_other_credentials_are_redacted() -> None:
    out = redact_target(b"/x?acc%65ss_token=S1&loginToken=S2&token=S3&ok=1")
    assert "S1" not in out and "S2" not in out and "S3" not in out
    assert out.endswith("&ok=1")


def test_target_without_credentials_is_unchanged() -> None:
    assert redact_target(b"/_matrix/client/versions") == "/_matrix/client/versions"
    assert redact_target(b"/a?b=1&c") == "/a?b=1&c"


def test_headers() -> None:
    got = redact_headers([("Authorization", "Bearer S"), ("content-type", "a"), ("Cookie", "c")])
    assert got == [("Authorization", "<redacted>"), ("content-type", "a"), ("Cookie", "<redacted>")]


def test_proxy_uses_the_same_implementation() -> None:
    assert common.redact_target is redact_target
    assert common.redact_headers is redact_headers


def test_every_secret_bearing_query_parameter_is_redacted() -> None:
    # issue 14: client_secret and sid were logged in query strings.
    target = (
        b"/_matrix/client/v3/validate/email/submitToken?token=T1&client_secret=C1&sid=S1"
        b"&session=U1&code=O1&state=O2&refresh_token=R1&id_access_token=I1&next_link=ok"
    )
    out = redact_target(target)
    for secret in ("T1", "C1", "S1", "U1", "O1", "O2", "R1", "I1"):
        assert secret not in out
    assert out.endswith("&next_link=ok")
