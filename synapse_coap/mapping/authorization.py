"""The Authorization option: an X-Matrix federation signature in compact form (origin and
destination as server-table references or text, the key id, the 64-byte signature as
bytes) when that round-trips exactly, else the header text as it is."""

from __future__ import annotations

import base64
import binascii
import re

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.mapping.text import _text, _utf8
from synapse_coap.wire.context import WireContext

_XMATRIX = re.compile(
    r'X-Matrix origin="([^"\\]*)",key="([^"\\]*)",sig="([^"\\]*)"(?:,destination="([^"\\]*)")?\Z'
)


# Authorization option forms (first byte).
AUTH_LITERAL = 0x80


AUTH_HAS_DEST = 0x01


AUTH_ED25519 = 0x02


AUTH_SIG64 = 0x04


_SERVER_REF = 0xE0  # field length bytes 0xe0-0xfe = server_names[b - 0xe0]


_MAX_FIELD = 0xDF


def _put_field(out: bytearray, text: str, context: WireContext | None) -> bool:
    if context is not None:
        ref = context.server_index(text)
        if ref is not None and ref < 0xFF - _SERVER_REF:
            out.append(_SERVER_REF + ref)
            return True
    raw = _utf8(text)
    if len(raw) > _MAX_FIELD:
        return False
    out.append(len(raw))
    out += raw
    return True


def _get_field(data: bytes, pos: int, context: WireContext | None) -> tuple[str, int]:
    if pos >= len(data):
        raise RemoteProtocolError("Authorization option truncated")
    b = data[pos]
    if b >= _SERVER_REF:
        names = context.server_names if context is not None else ()
        if b == 0xFF or b - _SERVER_REF >= len(names):
            raise RemoteProtocolError("unknown server reference in Authorization option")
        return names[b - _SERVER_REF], pos + 1
    end = pos + 1 + b
    if end > len(data):
        raise RemoteProtocolError("Authorization option truncated")
    return _text(data[pos + 1 : end], "Authorization field"), end


def encode_authorization(value: str, context: WireContext) -> bytes:
    """An Authorization header as the option value: compact X-Matrix when exact, else literal."""
    m = _XMATRIX.match(value)
    if m:
        origin, key, sig, dest = m.groups()
        form = 0
        out = bytearray(b"\0")
        ok = _put_field(out, origin, context)
        if dest is not None:
            form |= AUTH_HAS_DEST
            ok = ok and _put_field(out, dest, context)
        if key.startswith("ed25519:"):
            form |= AUTH_ED25519
            key = key[len("ed25519:") :]
        ok = ok and _put_field(out, key, None)
        raw_sig = _b64_exact(sig)
        if raw_sig is not None and len(raw_sig) == 64:
            form |= AUTH_SIG64
            out += raw_sig
        else:
            out += _utf8(sig)
        out[0] = form
        if ok:
            compact = bytes(out)
            try:
                if decode_authorization(compact, context) == value:
                    return compact
            except RemoteProtocolError:
                pass
    return bytes([AUTH_LITERAL]) + _utf8(value)


def _b64_exact(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode().rstrip("=") != text:
        return None
    return raw


def decode_authorization(data: bytes, context: WireContext) -> str:
    if not data:
        raise RemoteProtocolError("empty Authorization option")
    form = data[0]
    if form == AUTH_LITERAL:
        return _text(data[1:], "Authorization option")
    if form & ~(AUTH_HAS_DEST | AUTH_ED25519 | AUTH_SIG64):
        raise RemoteProtocolError(f"unknown Authorization option form {form:#x}")
    origin, pos = _get_field(data, 1, context)
    dest = None
    if form & AUTH_HAS_DEST:
        dest, pos = _get_field(data, pos, context)
    key, pos = _get_field(data, pos, None)
    if form & AUTH_ED25519:
        key = "ed25519:" + key
    rest = data[pos:]
    if form & AUTH_SIG64:
        if len(rest) != 64:
            raise RemoteProtocolError("X-Matrix signature is not 64 bytes")
        sig = base64.b64encode(rest).decode().rstrip("=")
    else:
        sig = _text(rest, "X-Matrix signature")
    header = f'X-Matrix origin="{origin}",key="{key}",sig="{sig}"'
    if dest is not None:
        header += f',destination="{dest}"'
    return header
