"""Strict UTF-8 for option values and header fields: text that does not decode is the peer's
protocol error, never a crash."""

from __future__ import annotations

from synapse_coap.errors import RemoteProtocolError


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from e


def _strict_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from e
