"""Strict parsing of one CoAP message from a datagram (RFC 7252 3), for every listener.

aiocoap's ``Message.decode`` accepts a token length of 9-15 and a payload
marker with no payload, and raises whatever an option's own decoder raises
(``UnicodeDecodeError`` for a Uri-Path that is not UTF-8, ...) instead of its
``UnparsableMessage``. RFC 7252 calls all three *message format errors*: a
Confirmable message with one is rejected with a Reset, anything else is
silently dropped (4.2, 4.3). :func:`decode_message` raises
:class:`MessageFormatError` for every such datagram, and :func:`reset_for`
gives the 4-byte Reset to send back, when one is due.
"""

from __future__ import annotations

import struct
from typing import Any

from aiocoap.error import UnparsableMessage
from aiocoap.message import Message

_CON = 0
_MAX_TOKEN = 8
_PAYLOAD_MARKER = 0xFF


class MessageFormatError(UnparsableMessage):  # type: ignore[misc]
    """The datagram is not a well-formed CoAP message (RFC 7252 3)."""


def _extended(nibble: int, data: bytes, pos: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        if pos + 1 > len(data):
            raise MessageFormatError("option header truncated")
        return data[pos] + 13, pos + 1
    if nibble == 14:
        if pos + 2 > len(data):
            raise MessageFormatError("option header truncated")
        return struct.unpack_from("!H", data, pos)[0] + 269, pos + 2
    raise MessageFormatError("reserved option delta or length 15")


def check_format(data: bytes) -> None:
    """Raise :class:`MessageFormatError` unless ``data`` is a well-formed CoAP message."""
    if len(data) < 4:
        raise MessageFormatError("shorter than the 4-byte CoAP header")
    if data[0] >> 6 != 1:
        raise MessageFormatError("CoAP version is not 1")
    tkl = data[0] & 0x0F
    if tkl > _MAX_TOKEN:
        raise MessageFormatError(f"token length {tkl} (9-15 are reserved)")
    code = data[1]
    pos = 4 + tkl
    if pos > len(data):
        raise MessageFormatError("token truncated")
    if code == 0 and (tkl or len(data) > 4):
        raise MessageFormatError("an Empty message with a token, options or payload")
    while pos < len(data):
        head = data[pos]
        pos += 1
        if head == _PAYLOAD_MARKER:
            if pos == len(data):
                raise MessageFormatError("payload marker with no payload")
            return
        _delta, pos = _extended(head >> 4, data, pos)
        length, pos = _extended(head & 0x0F, data, pos)
        if pos + length > len(data):
            raise MessageFormatError("option value truncated")
        pos += length


def decode_message(data: bytes, remote: Any) -> Message:
    """The aiocoap Message in ``data``; :class:`MessageFormatError` for any format error,
    including an option whose value does not decode (e.g. a Uri-Path that is not UTF-8)."""
    check_format(data)
    try:
        return Message.decode(data, remote)
    except UnparsableMessage as e:
        raise MessageFormatError(str(e)) from None
    except Exception as e:  # an option's own decoder (UnicodeDecodeError, ValueError ...)
        raise MessageFormatError(f"an option does not decode: {type(e).__name__}") from None


def reset_for(data: bytes) -> bytes | None:
    """The Reset rejecting a malformed Confirmable message (its Message ID), else None."""
    if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == _CON:
        return bytes([0x70, 0]) + data[2:4]
    return None


__all__ = ["MessageFormatError", "check_format", "decode_message", "reset_for"]
