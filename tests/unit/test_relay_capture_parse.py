"""Parsing tshark field output into IP-level counts (no capture needed)."""

from __future__ import annotations

from synapse_coap_lab.capture import Packet, estimate_tcp, parse_fields, summarize

# frame.time_relative, ip.len, ipv6.plen, tcp.srcport, tcp.dstport, tcp.len,
# tcp.flags.syn, tcp.flags.fin, tcp.flags.reset, udp.srcport, udp.dstport
LINES = [
    "0.000000\t60\t\t40000\t8448\t0\t1\t0\t0\t\t",  # SYN
    "0.000010\t60\t\t8448\t40000\t0\t1\t0\t0\t\t",  # SYN-ACK
    "0.000020\t52\t\t40000\t8448\t0\t0\t0\t0\t\t",  # ACK
    "0.000030\t552\t\t40000\t8448\t500\t0\t0\t0\t\t",  # data
    "0.000040\t52\t\t8448\t40000\t0\t0\t0\t0\t\t",  # ACK-only
    "0.5\t\t108\t\t\t\t\t\t\t5000\t5683",  # IPv6 UDP: 108 + 40
    "0.6\t128,100\t\t\t\t\t\t\t\t6000,6001\t5683,9",  # ICMP-quoted inner headers: first wins
    "0.7\t\t\t\t\t\t\t\t\t\t",  # not IP: skipped
]


def test_parse_fields_reads_ip_sizes_from_the_ip_header() -> None:
    packets = parse_fields(LINES)
    assert [p.ip_bytes for p in packets] == [60, 60, 52, 552, 52, 148, 128]
    assert packets[5] == Packet(0.5, 148, "udp", 5000, 5683)
    assert packets[6].src_port == 6000
    assert [p.ack_only for p in packets] == [False, False, True, False, True, False, False]


def test_summarize_splits_by_server_port_and_counts_acks() -> None:
    counts = summarize(parse_fields(LINES[:5]), server_port=8448)
    assert counts.packets == 5
    assert counts.ip_bytes == 60 + 60 + 52 + 552 + 52
    assert (counts.to_server_packets, counts.to_server_ip_bytes) == (3, 664)
    assert (counts.from_server_packets, counts.from_server_ip_bytes) == (2, 112)
    assert (counts.tcp_segments, counts.tcp_ack_only, counts.tcp_handshake) == (5, 2, 2)
    assert counts.udp_datagrams == 0
    assert counts.duration == 0.00004
    assert "5 packets, 776 B IP" in str(counts)


def test_tcp_estimate_matches_a_real_loopback_capture() -> None:
    """Golden: tshark on lo, one connection, 1000 bytes each way in one write each.

    SYN 60, SYN-ACK 60, ACK 52, data 1052, ACK 52, data 1052, ACK 52, FIN 52,
    FIN 52, ACK 52 = 10 packets, 2536 bytes (to server 6/1320, from 4/1216).
    """
    est = estimate_tcp(to_server_bytes=1000, from_server_bytes=1000, mss=65483)
    assert (est.packets, est.ip_bytes) == (10, 2536)
    assert (est.to_server_packets, est.to_server_ip_bytes) == (6, 1320)
    assert (est.from_server_packets, est.from_server_ip_bytes) == (4, 1216)
    assert (est.tcp_ack_only, est.tcp_handshake) == (4, 2)


def test_tcp_estimate_splits_large_writes_into_mss_segments() -> None:
    small = estimate_tcp(to_server_bytes=100, from_server_bytes=10_000, mss=1448)
    # 10000 bytes = 7 segments of at most 1448 bytes, 52 header bytes each
    assert small.from_server_ip_bytes == 10_000 + 7 * 52 + 60 + 52 + 52
    v6 = estimate_tcp(to_server_bytes=100, from_server_bytes=100, ipv6=True)
    assert v6.ip_bytes - estimate_tcp(to_server_bytes=100, from_server_bytes=100).ip_bytes == (
        20 * v6.packets
    )
