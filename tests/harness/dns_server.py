"""A tiny UDP DNS responder for tests: answers from a zone held in memory.

It runs in a thread on 127.0.0.1 (a free port), answers every query from
``zone[(name, qtype)]`` (a list of :class:`~synapse_coap.wire.dns.Record`;
NXDOMAIN for a name it holds nothing for), with the addresses of SRV targets in
the additional section when ``glue`` is on. ``drop`` datagrams are ignored first
(a lost query), and ``queries`` records what was asked. The zone may be changed
while it runs (a listener added or moved).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.wire import dns


class DnsServer:
    def __init__(
        self, zone: dict[tuple[str, int], list[dns.Record]], *, glue: bool = False
    ) -> None:
        self.zone = zone
        self.glue = glue
        self.drop = 0
        self.queries: list[tuple[str, int]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    @property
    def flag(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self.answer(data)
            if answer is not None:
                self._sock.sendto(answer, peer)

    def answer(self, query: bytes) -> bytes | None:
        """The response to one query datagram (None: dropped)."""
        try:
            qid, qname, qtype = parse_query(query)
        except RemoteProtocolError:
            return None
        self.queries.append((qname, qtype))
        if self.drop > 0:
            self.drop -= 1
            return None
        key = (qname.lower().rstrip("."), qtype)
        names = {n for n, _ in self.zone}
        if key[0] not in names:
            return dns.encode_response(qid, qname, qtype, rcode=dns.RCODE_NXDOMAIN)
        answers = list(self.zone.get(key, []))
        additional: list[dns.Record] = []
        if self.glue:
            for rr in answers:
                if isinstance(rr.data, dns.SrvRecord):
                    for t in (dns.TYPE_A, dns.TYPE_AAAA):
                        additional += self.zone.get((rr.data.target, t), [])
        return dns.encode_response(qid, qname, qtype, answers=answers, additional=additional)


def parse_query(data: bytes) -> tuple[int, str, int]:
    """(id, name, type) of a query datagram; RemoteProtocolError if it is not one."""
    if len(data) < 17:
        raise RemoteProtocolError("short query")
    # a query is a response without the QR bit: parse it as one with QR set
    flagged = data[:2] + bytes([data[2] | 0x80]) + data[3:]
    msg = dns.parse_response(flagged)
    return msg.id, msg.qname, msg.qtype
