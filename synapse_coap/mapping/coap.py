"""RFC 7252 message serialisation (section 3), sans-I/O.

``encode_coap`` / ``decode_coap`` turn a :class:`CoapMessage` plus the
transport fields (type, message id, token) into datagram bytes and back.
Decoding never raises anything but :class:`RemoteProtocolError`.
"""

from __future__ import annotations

from synapse_coap.errors import LocalProtocolError, RemoteProtocolError
from synapse_coap.mapping.messages import CoapMessage, CoapOption

#: A message with more options than this is refused (a real Matrix request
#: needs well under 100; this keeps a hostile datagram from costing much).
MAX_OPTIONS = 1024
#: Largest single option value we emit or accept (the 2-byte extended length maximum).
MAX_OPTION_LENGTH = 65535 + 269


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    if value <= 65535 + 269:
        return 14, (value - 269).to_bytes(2, "big")
    raise LocalProtocolError(f"CoAP option delta/length {value} is too large")


def sort_options(options: tuple[CoapOption, ...] | list[CoapOption]) -> tuple[CoapOption, ...]:
    """Options in ascending number order; repeats keep their relative order."""
    return tuple(sorted(options, key=lambda o: o.number))


def encode_options(options: tuple[CoapOption, ...] | list[CoapOption]) -> bytes:
    out = bytearray()
    previous = 0
    for opt in sort_options(options):
        if not 0 <= opt.number <= 65535:
            raise LocalProtocolError(f"CoAP option number {opt.number} out of range")
        delta_nib, delta_ext = _ext(opt.number - previous)
        len_nib, len_ext = _ext(len(opt.value))
        out.append((delta_nib << 4) | len_nib)
        out += delta_ext
        out += len_ext
        out += opt.value
        previous = opt.number
    return bytes(out)


def encode_coap(msg: CoapMessage, *, mtype: int = 0, mid: int = 0, token: bytes = b"") -> bytes:
    """Serialise a message. ``mtype`` 0=CON 1=NON 2=ACK 3=RST."""
    if not 0 <= mtype <= 3:
        raise LocalProtocolError(f"CoAP message type {mtype} out of range")
    if not 0 <= mid <= 0xFFFF:
        raise LocalProtocolError(f"CoAP message id {mid} out of range")
    if len(token) > 8:
        raise LocalProtocolError("CoAP token longer than 8 bytes")
    if not 0 <= msg.code <= 255:
        raise LocalProtocolError(f"CoAP code {msg.code} out of range")
    head = bytes([0x40 | (mtype << 4) | len(token), msg.code]) + mid.to_bytes(2, "big")
    body = encode_options(msg.options)
    if msg.payload:
        body += b"\xff" + msg.payload
    return head + token + body


def _read_ext(nib: int, data: bytes, pos: int, what: str) -> tuple[int, int]:
    if nib < 13:
        return nib, pos
    if nib == 13:
        if pos + 1 > len(data):
            raise RemoteProtocolError(f"CoAP option {what} truncated")
        return data[pos] + 13, pos + 1
    if nib == 14:
        if pos + 2 > len(data):
            raise RemoteProtocolError(f"CoAP option {what} truncated")
        return int.from_bytes(data[pos : pos + 2], "big") + 269, pos + 2
    raise RemoteProtocolError(f"CoAP option {what} nibble 15 is reserved")


def decode_options(data: bytes, pos: int = 0) -> tuple[tuple[CoapOption, ...], int]:
    """Parse options from ``pos``; returns them and the position of the payload (after 0xFF) or end."""
    options: list[CoapOption] = []
    number = 0
    end = len(data)
    while pos < end:
        byte = data[pos]
        if byte == 0xFF:
            pos += 1
            if pos == end:
                raise RemoteProtocolError("CoAP payload marker followed by an empty payload")
            return tuple(options), pos
        pos += 1
        delta, pos = _read_ext(byte >> 4, data, pos, "delta")
        length, pos = _read_ext(byte & 0x0F, data, pos, "length")
        number += delta
        if number > 65535:
            raise RemoteProtocolError("CoAP option number above 65535")
        if pos + length > end:
            raise RemoteProtocolError("CoAP option value truncated")
        options.append(CoapOption(number, bytes(data[pos : pos + length])))
        pos += length
        if len(options) > MAX_OPTIONS:
            raise RemoteProtocolError(f"more than {MAX_OPTIONS} CoAP options")
    return tuple(options), pos


def decode_coap(data: bytes) -> tuple[int, int, bytes, CoapMessage]:
    """Parse a datagram: ``(mtype, mid, token, message)``; RemoteProtocolError if malformed."""
    if len(data) < 4:
        raise RemoteProtocolError("CoAP message shorter than its 4-byte header")
    first = data[0]
    if first >> 6 != 1:
        raise RemoteProtocolError(f"unsupported CoAP version {first >> 6}")
    mtype = (first >> 4) & 3
    tkl = first & 0x0F
    if tkl > 8:
        raise RemoteProtocolError(f"reserved CoAP token length {tkl}")
    code = data[1]
    mid = int.from_bytes(data[2:4], "big")
    if len(data) < 4 + tkl:
        raise RemoteProtocolError("CoAP token truncated")
    token = bytes(data[4 : 4 + tkl])
    if code == 0 and len(data) != 4:
        raise RemoteProtocolError("empty CoAP message with token, options or payload")
    options, pos = decode_options(data, 4 + tkl)
    payload = bytes(data[pos:]) if pos < len(data) else b""
    return mtype, mid, token, CoapMessage(code, options, payload)
