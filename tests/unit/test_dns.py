"""The sans-I/O DNS codec (synapse_coap.wire.dns): golden packets built by hand per
RFC 1035 / 2782 / 3596, round trips, bounds, and bad input that never crashes."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.errors import LimitExceeded, RemoteProtocolError
from synapse_coap.wire import dns
from synapse_coap.wire.dns import Record, SrvRecord


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


# -- golden packets --------------------------------------------------------------------

#: the query "_matrix-coap._udp.example.org SRV IN", id 0x1234, RD set
SRV_QUERY = hexbytes(
    """
    1234 0100 0001 0000 0000 0000                # id, RD, 1 question
    0c 5f6d61747269782d636f6170                  # _matrix-coap
    04 5f756470                                  # _udp
    07 6578616d706c65                            # example (offset 30 = 0x1e)
    03 6f7267 00                                 # org .
    0021 0001                                    # SRV IN
    """
)

#: its answer: two SRV records (targets compressed against the question's
#: "example.org"), and l1's address in the additional section (owner compressed
#: against the first target)
SRV_ANSWER = hexbytes(
    """
    1234 8180 0001 0002 0000 0001                # id, QR RD RA NOERROR, 1/2/0/1
    0c 5f6d61747269782d636f6170 04 5f756470
    07 6578616d706c65 03 6f7267 00 0021 0001     # the question, ends at 47
    c00c 0021 0001 00000e10 000b                 # -> question name, SRV IN, ttl 3600
    000a 003c 1633 02 6c31 c01e                  # prio 10 weight 60 port 5683 l1.example.org
                                                 # ("l1" at offset 65 = 0x41)
    c00c 0021 0001 00000e10 000b
    000a 0028 1634 02 6c32 c01e                  # prio 10 weight 40 port 5684 l2.example.org
    c041 0001 0001 0000012c 0004 c0000201        # l1.example.org A 192.0.2.1, ttl 300
    """
)

#: "l2.example.org AAAA": a CNAME to h.example.net, and its AAAA
AAAA_ANSWER = hexbytes(
    """
    beef 8180 0001 0002 0000 0000
    02 6c32 07 6578616d706c65 03 6f7267 00 001c 0001   # question, ends at 32
    c00c 0005 0001 0000003c 000f                       # CNAME, ttl 60
    01 68 07 6578616d706c65 03 6e6574 00               # h.example.net ("h" at 44 = 0x2c)
    c02c 001c 0001 0000003c 0010                       # h.example.net AAAA, ttl 60
    20010db8000000000000000000000002
    """
)

NXDOMAIN = hexbytes(
    """
    1234 8183 0001 0000 0000 0000
    0c 5f6d61747269782d636f6170 04 5f756470 07 6578616d706c65 03 6f7267 00 0021 0001
    """
)

NAME = "_matrix-coap._udp.example.org"


def test_query_is_the_golden_packet() -> None:
    assert dns.encode_query(0x1234, NAME, dns.TYPE_SRV) == SRV_QUERY
    assert dns.encode_query(0x1234, NAME + ".", dns.TYPE_SRV) == SRV_QUERY


def test_srv_answer_with_compression_and_glue() -> None:
    msg = dns.parse_response(SRV_ANSWER)
    assert (msg.id, msg.rcode, msg.truncated, msg.qname, msg.qtype) == (
        0x1234,
        0,
        False,
        NAME,
        dns.TYPE_SRV,
    )
    assert dns.matches(msg, 0x1234, NAME.upper(), dns.TYPE_SRV)
    assert not dns.matches(msg, 0x1235, NAME, dns.TYPE_SRV)
    assert not dns.matches(msg, 0x1234, NAME, dns.TYPE_A)
    assert [rr.data for rr in msg.records(dns.TYPE_SRV, NAME)] == [
        SrvRecord(10, 60, 5683, "l1.example.org"),
        SrvRecord(10, 40, 5684, "l2.example.org"),
    ]
    assert msg.records(dns.TYPE_A, "l1.example.org") == [
        Record("l1.example.org", dns.TYPE_A, 300, "192.0.2.1")
    ]
    assert msg.records(dns.TYPE_A, "l2.example.org") == []


def test_aaaa_answer_through_a_cname() -> None:
    msg = dns.parse_response(AAAA_ANSWER)
    assert [rr.data for rr in msg.records(dns.TYPE_AAAA, "L2.example.org.")] == ["2001:db8::2"]
    assert msg.records(dns.TYPE_AAAA, "other.example.org") == []


def test_nxdomain() -> None:
    msg = dns.parse_response(NXDOMAIN)
    assert msg.rcode == dns.RCODE_NXDOMAIN
    assert msg.answers == ()


def test_round_trip_of_what_the_encoder_writes() -> None:
    answers = [
        Record(NAME, dns.TYPE_SRV, 30, SrvRecord(0, 5, 6000, "a.example")),
        Record(NAME, dns.TYPE_SRV, 0xFFFFFFFF, SrvRecord(1, 0, 1, ".")),  # ttl > 2**31 -> 0
    ]
    glue = [
        Record("a.example", dns.TYPE_A, 10**9, "127.0.0.2"),  # over a week -> a week
        Record("a.example", dns.TYPE_AAAA, 5, "::1"),
    ]
    wire = dns.encode_response(
        7, NAME, dns.TYPE_SRV, answers=answers, additional=glue, truncated=True
    )
    msg = dns.parse_response(wire)
    assert msg.truncated
    assert [rr.ttl for rr in msg.answers] == [30, 0]
    assert msg.answers[0] == answers[0]
    assert msg.answers[1].data == SrvRecord(1, 0, 1, ".")
    assert [rr.data for rr in msg.additional] == ["127.0.0.2", "::1"]
    assert msg.additional[0].ttl == dns.MAX_TTL


def test_other_types_and_classes_are_skipped() -> None:
    txt = b"\xc0\x0c" + struct.pack(">HHIH", 16, 1, 60, 4) + b"\x03abc"
    chaos = b"\xc0\x0c" + struct.pack(">HHIH", dns.TYPE_A, 3, 60, 4) + bytes(4)
    head = NXDOMAIN[:3] + b"\x80" + b"\x00\x01\x00\x02\x00\x00\x00\x00"
    msg = dns.parse_response(head + NXDOMAIN[12:] + txt + chaos)
    assert msg.answers == ()


@pytest.mark.parametrize(
    "name", ["a..b", "x" * 64 + ".org", ".".join(["abcdefgh"] * 29), "ünï.org"]
)
def test_names_dns_cannot_carry_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        dns.encode_query(1, name, dns.TYPE_A)


# -- bounds and bad input -------------------------------------------------------------


def with_answer_name(name_bytes: bytes, extra: bytes = b"") -> bytes:
    """A response whose one answer's owner name is ``name_bytes`` (after ``extra``)."""
    question = b"\x01a\x00" + struct.pack(">HH", dns.TYPE_A, 1)  # offsets 12..18
    head = struct.pack(">HHHHHH", 1, 0x8180, 1, 1, 0, 0)
    return head + question + extra + name_bytes + struct.pack(">HHIH", 1, 1, 1, 4) + bytes(4)


@pytest.mark.parametrize(
    "packet",
    [
        with_answer_name(b"\xc0\x13"),  # a pointer to itself (offset 19)
        with_answer_name(b"\xc0\x40"),  # a pointer forwards
        with_answer_name(b"\x01b\xc0\x13"),  # a pointer back into its own name: a loop
        with_answer_name(b"\x80"),  # reserved label type
        with_answer_name(b"\x3fabc"),  # a label past the end
        SRV_ANSWER[:-1],
        SRV_ANSWER[:11],
        SRV_QUERY,  # not a response
        NXDOMAIN[:2] + b"\x81\x83\x00\x02" + NXDOMAIN[6:],  # two questions
        AAAA_ANSWER[:-17] + b"\x00\x0f" + AAAA_ANSWER[-16:-1],  # AAAA of 15 bytes
    ],
)
def test_malformed_messages_are_refused(packet: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        dns.parse_response(packet)


def pointer_chain(hops: int) -> bytes:
    """A response whose A record's owner name is reached through ``hops`` pointers: a
    skipped TXT record at offset 19 (owner: the root) holds a chain of pointers, each
    to the one before, the first to the root."""
    head = struct.pack(">HHHHHH", 1, 0x8180, 1, 2, 0, 0)
    question = b"\x01a\x00" + struct.pack(">HH", dns.TYPE_A, 1)  # offsets 12..18
    chain = b"".join(
        struct.pack(">H", 0xC000 | (19 if i == 0 else 30 + 2 * (i - 1))) for i in range(hops - 1)
    )
    txt = b"\x00" + struct.pack(">HHIH", 16, 1, 1, len(chain)) + chain  # rdata at 30
    last = 0xC000 | (19 if hops == 1 else 30 + 2 * (hops - 2))
    a = struct.pack(">H", last) + struct.pack(">HHIH", 1, 1, 1, 4) + bytes(4)
    return head + question + txt + a


def test_pointer_chains_and_long_names_are_bounded() -> None:
    assert dns.parse_response(pointer_chain(dns.MAX_POINTERS)).answers[0].name == ""
    with pytest.raises(LimitExceeded):
        dns.parse_response(pointer_chain(dns.MAX_POINTERS + 1))
    long_name = b"".join(b"\x3f" + b"x" * 63 for _ in range(4)) + b"\x00"
    with pytest.raises(LimitExceeded):
        dns.parse_response(with_answer_name(long_name))


def test_record_counts_and_size_are_bounded() -> None:
    many = bytearray(SRV_ANSWER)
    many[6:8] = struct.pack(">H", dns.MAX_RECORDS)
    with pytest.raises(LimitExceeded):
        dns.parse_response(bytes(many))
    with pytest.raises(LimitExceeded):
        dns.parse_response(SRV_ANSWER + bytes(dns.MAX_MESSAGE))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    try:
        dns.parse_response(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.sampled_from([SRV_ANSWER, AAAA_ANSWER, NXDOMAIN]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
)
def test_damaged_golden_packets_parse_or_raise(
    packet: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    damaged = bytearray(packet)
    for where, value in flips:
        if where < len(damaged):
            damaged[where] = value
    try:
        dns.parse_response(bytes(damaged[: len(damaged) - cut]))
    except RemoteProtocolError:
        pass


srv_records = st.builds(
    SrvRecord,
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.lists(st.text("abz09-", min_size=1, max_size=20), min_size=1, max_size=4).map(".".join),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(srv_records, max_size=10), st.integers(0, 65535), st.integers(0, 2**31 - 1))
def test_srv_answers_round_trip(records: list[SrvRecord], qid: int, ttl: int) -> None:
    answers = [Record(NAME, dns.TYPE_SRV, min(ttl, dns.MAX_TTL), r) for r in records]
    msg = dns.parse_response(dns.encode_response(qid, NAME, dns.TYPE_SRV, answers=answers))
    assert dns.matches(msg, qid, NAME, dns.TYPE_SRV)
    assert list(msg.answers) == answers


# -- RFC 2782 order --------------------------------------------------------------------


def test_order_is_by_priority_then_weighted_and_spreads_equal_priorities() -> None:
    recs = [
        SrvRecord(20, 1, 1, "backup"),
        SrvRecord(10, 75, 1, "big"),
        SrvRecord(10, 25, 1, "small"),
    ]
    firsts = Counter(
        dns.order_srv_records(recs, random.Random(seed))[0].target for seed in range(400)
    )
    assert set(firsts) == {"big", "small"}  # "backup" is never first
    assert 240 < firsts["big"] < 360  # 3:1 by weight
    for seed in range(20):
        assert dns.order_srv_records(recs, random.Random(seed))[-1].target == "backup"


def test_ip_literals() -> None:
    assert dns.is_ip_literal("192.0.2.1") and dns.is_ip_literal("2001:db8::1")
    assert not dns.is_ip_literal("example.org")


@settings(max_examples=100, deadline=None)
@given(st.lists(srv_records, max_size=12), st.integers(0, 2**32))
def test_order_is_a_priority_sorted_permutation(records: list[SrvRecord], seed: int) -> None:
    out = dns.order_srv_records(records, random.Random(seed))
    usable = [r for r in records if r.target not in (".", "")]
    assert sorted(out, key=repr) == sorted(usable, key=repr)
    assert [r.priority for r in out] == sorted(r.priority for r in out)
