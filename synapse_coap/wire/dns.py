"""DNS messages for SRV discovery of CoAP listeners: a sans-I/O encoder and parser.

Both sides that find CoAP listeners by name use this module: the module's outgoing
federation (``synapse_coap.synapse.discovery``, DNS through Twisted) and the sidecar
(``synapse_coap.proxy.resolver``, DNS over asyncio UDP). It holds:

- :class:`SrvRecord` and :func:`order_srv_records`: RFC 2782 order (priority
  ascending, weighted random within a priority), the "spread" of many clients over
  equal-priority listeners;
- :func:`encode_query` and :func:`parse_response`: RFC 1035 messages with only what
  SRV, A, AAAA and CNAME need. :func:`encode_response` builds answers (test servers,
  round trips).

Bad input never crashes the parser: every malformed, truncated or oversized message
raises :class:`~synapse_coap.errors.RemoteProtocolError` (``LimitExceeded`` for a
bound), and nothing else. Bounds: :data:`MAX_MESSAGE` bytes, :data:`MAX_RECORDS`
records per message, names of at most 255 bytes, and compression pointers that must
point backwards (before the label that holds them), at most :data:`MAX_POINTERS` per
name, so a name is read in bounded time.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterable, Sequence

import attrs

from synapse_coap.errors import LimitExceeded, RemoteProtocolError

#: The SRV service label of CoAP listeners (the transport is always UDP; Noise inside):
#: ``_matrix-coap._udp.<host>``, for federation and for clients alike.
SRV_SERVICE = "_matrix-coap._udp"
#: Bound on SRV records used per name (a hostile zone cannot make us try thousands).
MAX_SRV_TARGETS = 8
#: Record types used here (RFC 1035, RFC 3596, RFC 2782).
TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_SRV = 33
CLASS_IN = 1
#: Response codes that end a lookup (RFC 1035 4.1.1).
RCODE_NOERROR = 0
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
#: The largest message parsed (a DNS message over TCP is at most this; over UDP less).
MAX_MESSAGE = 65535
#: Records parsed from one message, all sections together.
MAX_RECORDS = 64
#: Compression pointers followed in one name.
MAX_POINTERS = 16
#: Longest name on the wire (RFC 1035 2.3.4), and longest label.
MAX_NAME = 255
MAX_LABEL = 63
#: TTLs over this are taken as this (RFC 2181 8: at most 2**31 - 1; a week is plenty).
MAX_TTL = 7 * 24 * 3600

_HEADER = struct.Struct(">HHHHHH")
_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100
_FLAG_RA = 0x0080


@attrs.frozen
class SrvRecord:
    """One SRV record's data (RFC 2782)."""

    priority: int
    weight: int
    port: int
    target: str


def order_srv_records(records: Iterable[SrvRecord], rng: random.Random) -> list[SrvRecord]:
    """RFC 2782 order: priority ascending; within a priority, weighted random.

    Zero-weight records come after the weighted ones of their priority (in
    random order). A single record with target "." means "no service": [].
    """
    recs = list(records)
    if len(recs) == 1 and recs[0].target in (".", ""):
        return []
    recs = [r for r in recs if r.target not in (".", "")]
    out: list[SrvRecord] = []
    for prio in sorted({r.priority for r in recs}):
        group = sorted(
            (r for r in recs if r.priority == prio), key=lambda r: (r.target, r.port, r.weight)
        )
        weighted = [r for r in group if r.weight > 0]
        zero = [r for r in group if r.weight <= 0]
        while weighted:
            total = sum(r.weight for r in weighted)
            pick = rng.randint(1, total)
            for i, r in enumerate(weighted):
                pick -= r.weight
                if pick <= 0:
                    out.append(weighted.pop(i))
                    break
        rng.shuffle(zero)
        out.extend(zero)
    return out


@attrs.frozen
class Record:
    """One resource record: ``data`` is an :class:`SrvRecord` (SRV), an address string
    (A, AAAA) or a name (CNAME); other types are skipped by the parser."""

    name: str
    rtype: int
    ttl: int
    data: SrvRecord | str


@attrs.frozen
class Response:
    id: int
    rcode: int
    #: the TC bit: the answer did not fit (what came is still parsed; no TCP retry here)
    truncated: bool
    qname: str
    qtype: int
    answers: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()

    def records(self, rtype: int, name: str) -> list[Record]:
        """The answers of ``rtype`` for ``name``, following CNAMEs in the answer
        section (then the additional section, where servers put targets' addresses)."""
        names = {_fold(name)}
        for rr in self.answers:
            if rr.rtype == TYPE_CNAME and _fold(rr.name) in names and isinstance(rr.data, str):
                names.add(_fold(rr.data))
        return [
            rr
            for rr in (*self.answers, *self.additional)
            if rr.rtype == rtype and _fold(rr.name) in names
        ]


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name to look up)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _fold(name: str) -> str:
    return name.lower().rstrip(".")


# ---------------------------------------------------------------------------------------
# encoding


def encode_name(name: str) -> bytes:
    """``name`` as wire labels (no compression); ValueError for a name DNS cannot carry."""
    text = name.rstrip(".")
    out = bytearray()
    if text:
        for label in text.split("."):
            raw = label.encode("ascii") if label.isascii() else b""
            if not raw or len(raw) > MAX_LABEL:
                raise ValueError(f"not a DNS name: {name!r}")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"DNS name over {MAX_NAME} bytes: {name!r}")
    return bytes(out)


def encode_query(query_id: int, name: str, qtype: int) -> bytes:
    """A standard recursive query (RD set) for ``name`` of ``qtype``, class IN."""
    return (
        _HEADER.pack(query_id & 0xFFFF, _FLAG_RD, 1, 0, 0, 0)
        + encode_name(name)
        + struct.pack(">HH", qtype, CLASS_IN)
    )


def _encode_record(rr: Record) -> bytes:
    data = rr.data
    if isinstance(data, SrvRecord):
        rdata = struct.pack(">HHH", data.priority, data.weight, data.port) + encode_name(
            data.target
        )
    elif rr.rtype == TYPE_CNAME:
        rdata = encode_name(data)
    else:
        rdata = ipaddress.ip_address(data).packed
    return (
        encode_name(rr.name)
        + struct.pack(">HHIH", rr.rtype, CLASS_IN, rr.ttl & 0xFFFFFFFF, len(rdata))
        + rdata
    )


def encode_response(
    query_id: int,
    qname: str,
    qtype: int,
    *,
    rcode: int = RCODE_NOERROR,
    answers: Sequence[Record] = (),
    additional: Sequence[Record] = (),
    truncated: bool = False,
) -> bytes:
    """The answer a recursive server gives (QR, RD, RA set); no name compression."""
    flags = _FLAG_QR | _FLAG_RD | _FLAG_RA | (rcode & 0xF) | (_FLAG_TC if truncated else 0)
    return (
        _HEADER.pack(query_id & 0xFFFF, flags, 1, len(answers), 0, len(additional))
        + encode_name(qname)
        + struct.pack(">HH", qtype, CLASS_IN)
        + b"".join(_encode_record(rr) for rr in (*answers, *additional))
    )


# ---------------------------------------------------------------------------------------
# parsing


def _read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` and the offset after it (after the first pointer, if any)."""
    labels: list[str] = []
    length = 1
    end: int | None = None
    pointers = 0
    pos = offset
    while True:
        if pos >= len(msg):
            raise RemoteProtocolError("DNS name runs past the message")
        size = msg[pos]
        if size & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                raise RemoteProtocolError("DNS compression pointer runs past the message")
            target = ((size & 0x3F) << 8) | msg[pos + 1]
            if target >= pos:
                raise RemoteProtocolError("DNS compression pointer does not point backwards")
            pointers += 1
            if pointers > MAX_POINTERS:
                raise LimitExceeded(f"DNS name with over {MAX_POINTERS} compression pointers")
            if end is None:
                end = pos + 2
            pos = target
            continue
        if size & 0xC0:
            raise RemoteProtocolError(f"DNS label type 0x{size & 0xC0:02x} is not supported")
        if size == 0:
            return ".".join(labels), (pos + 1 if end is None else end)
        if pos + 1 + size > len(msg):
            raise RemoteProtocolError("DNS label runs past the message")
        length += size + 1
        if length > MAX_NAME:
            raise LimitExceeded(f"DNS name over {MAX_NAME} bytes")
        labels.append(msg[pos + 1 : pos + 1 + size].decode("ascii", "replace"))
        pos += 1 + size


def _read_record(msg: bytes, offset: int) -> tuple[Record | None, int]:
    name, pos = _read_name(msg, offset)
    if pos + 10 > len(msg):
        raise RemoteProtocolError("DNS record header runs past the message")
    rtype, rclass, ttl, rdlength = struct.unpack_from(">HHIH", msg, pos)
    pos += 10
    end = pos + rdlength
    if end > len(msg):
        raise RemoteProtocolError("DNS record data runs past the message")
    ttl = 0 if ttl >= 0x80000000 else min(ttl, MAX_TTL)
    if rclass != CLASS_IN:
        return None, end
    data: SrvRecord | str
    if rtype in (TYPE_A, TYPE_AAAA):
        if rdlength != (4 if rtype == TYPE_A else 16):
            raise RemoteProtocolError(f"DNS address record of {rdlength} bytes")
        data = str(ipaddress.ip_address(msg[pos:end]))
    elif rtype == TYPE_SRV:
        if rdlength < 7:
            raise RemoteProtocolError(f"DNS SRV record of {rdlength} bytes")
        priority, weight, port = struct.unpack_from(">HHH", msg, pos)
        target, after = _read_name(msg[:end], pos + 6)
        if after != end:
            raise RemoteProtocolError("DNS SRV record length does not match its data")
        data = SrvRecord(priority, weight, port, target or ".")
    elif rtype == TYPE_CNAME:
        data, after = _read_name(msg[:end], pos)
        if after != end:
            raise RemoteProtocolError("DNS CNAME record length does not match its data")
    else:
        return None, end
    return Record(name, rtype, ttl, data), end


def parse_response(msg: bytes) -> Response:
    """A DNS response, with its SRV, A, AAAA and CNAME records (others skipped).

    Raises RemoteProtocolError (or LimitExceeded) for anything malformed, oversized
    or not a response to one standard query; never anything else.
    """
    if len(msg) > MAX_MESSAGE:
        raise LimitExceeded(f"DNS message over {MAX_MESSAGE} bytes")
    if len(msg) < _HEADER.size:
        raise RemoteProtocolError("DNS message shorter than its header")
    query_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(msg)
    if not flags & _FLAG_QR or (flags >> 11) & 0xF != 0:
        raise RemoteProtocolError("not a DNS response to a standard query")
    if qdcount != 1:
        raise RemoteProtocolError(f"DNS response with {qdcount} questions")
    if ancount + nscount + arcount > MAX_RECORDS:
        raise LimitExceeded(f"DNS response with over {MAX_RECORDS} records")
    qname, pos = _read_name(msg, _HEADER.size)
    if pos + 4 > len(msg):
        raise RemoteProtocolError("DNS question runs past the message")
    qtype, _qclass = struct.unpack_from(">HH", msg, pos)
    pos += 4
    sections: list[list[Record]] = [[], [], []]
    for section, count in zip(sections, (ancount, nscount, arcount), strict=True):
        for _ in range(count):
            rr, pos = _read_record(msg, pos)
            if rr is not None:
                section.append(rr)
    return Response(
        id=query_id,
        rcode=flags & 0xF,
        truncated=bool(flags & _FLAG_TC),
        qname=qname,
        qtype=qtype,
        answers=tuple(sections[0]),
        additional=tuple(sections[2]),
    )


def matches(response: Response, query_id: int, name: str, qtype: int) -> bool:
    """Whether ``response`` answers our query (id, name and type: a stray or spoofed
    datagram does not)."""
    return (
        response.id == query_id and response.qtype == qtype and _fold(response.qname) == _fold(name)
    )
