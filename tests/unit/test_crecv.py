"""The listener's socket read (synapse_coap/transport/_crecv.c, ``recvmmsg``) against
``recvfrom`` on real loopback sockets: the same datagrams, in the same order, with the
same addresses (IPv4, IPv6, IPv4 on a dual-stack socket), empty and largest datagrams,
the count and the slots, an empty socket without an exception, an error as recvfrom
raises it; and ``BatchReader.readable`` with either read.

The C module runs here in both test runs: from the native build, and on the
plain-Python sources (SYNAPSE_COAP_PURE=1, where the package cannot import it) loaded
from its extension.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.transport import batch as batch_mod
from synapse_coap.transport.batch import BatchReader, recvfrom_batch
from tests.harness.cbody_fuzz import c_module

#: the largest UDP payload over IPv4
LARGEST_V4 = 65507


@pytest.fixture(scope="module")
def crecv() -> Any:
    return c_module("synapse_coap.transport._crecv", batch_mod._CRECV)


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    tx.bind((host, 0))
    rx.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return rx, tx


@pytest.fixture
def v4() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx, tx = _pair(socket.AF_INET, "127.0.0.1")
    yield rx, tx
    rx.close()
    tx.close()


def _v6_pair() -> tuple[socket.socket, socket.socket]:
    try:
        return _pair(socket.AF_INET6, "::1")
    except OSError as e:  # pragma: no cover - a host without IPv6 loopback
        pytest.skip(f"no IPv6 loopback here: {e}")


def _wait(sock: socket.socket) -> None:
    """Until ``sock`` is readable (loopback delivers at once; this only makes sure)."""
    ready, _, _ = select.select([sock], [], [], 5.0)
    assert ready, "nothing arrived on loopback within 5 s"


def _send(tx: socket.socket, rx: socket.socket, payloads: list[bytes]) -> None:
    for p in payloads:
        tx.sendto(p, rx.getsockname())
    _wait(rx)


def _read_all(
    read: Callable[[socket.socket, int], list[Any]], rx: socket.socket, n: int
) -> list[Any]:
    """``n`` datagrams read with ``read`` (loopback has them all queued once sent)."""
    out: list[Any] = []
    while len(out) < n:
        got = read(rx, n - len(out))
        if not got:
            _wait(rx)
        out += got
    return out


def _c_read(crecv: Any) -> Callable[[socket.socket, int], list[Any]]:
    return lambda sock, count: crecv.recv_batch(sock.fileno(), count)


def test_ipv4_datagrams_and_addresses_are_recvfroms(crecv: Any, v4: Any) -> None:
    rx, tx = v4
    payloads = [b"\xc0record", b"", b"x" * 1400, bytes(range(256)) * 4]
    _send(tx, rx, payloads)
    got = _read_all(_c_read(crecv), rx, len(payloads))
    _send(tx, rx, payloads)
    want = _read_all(recvfrom_batch, rx, len(payloads))
    assert got == want == [(p, tx.getsockname()) for p in payloads]
    assert all(type(d) is bytes and type(a) is tuple for d, a in got)
    assert crecv.recv_batch(rx.fileno(), 8) == []  # empty: a list, nothing raised


def test_the_largest_ipv4_datagram_whole(crecv: Any, v4: Any) -> None:
    rx, tx = v4
    big = bytes(i % 251 for i in range(LARGEST_V4))
    _send(tx, rx, [big, b"after"])
    assert _read_all(_c_read(crecv), rx, 2) == [
        (big, tx.getsockname()),
        (b"after", tx.getsockname()),
    ]


def test_ipv6_addresses_are_recvfroms(crecv: Any) -> None:
    rx, tx = _v6_pair()
    try:
        _send(tx, rx, [b"one", b"two"])
        got = _read_all(_c_read(crecv), rx, 2)
        _send(tx, rx, [b"one", b"two"])
        want = _read_all(recvfrom_batch, rx, 2)
        assert got == want
        host, port, flowinfo, scope_id = got[0][1]
        assert (host, port, flowinfo, scope_id) == ("::1", tx.getsockname()[1], 0, 0)
    finally:
        rx.close()
        tx.close()


def test_ipv4_on_a_dual_stack_socket_is_a_mapped_address(crecv: Any) -> None:
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            rx.bind(("::", 0))
        except OSError as e:  # pragma: no cover - a host without IPv6
            pytest.skip(f"no dual-stack socket here: {e}")
        rx.setblocking(False)
        port = rx.getsockname()[1]
        tx.bind(("127.0.0.1", 0))
        for _ in range(2):
            tx.sendto(b"v4", ("127.0.0.1", port))
        _wait(rx)
        got = _read_all(_c_read(crecv), rx, 1)
        want = _read_all(recvfrom_batch, rx, 1)
        assert got == want
        assert got[0][1][:2] == ("::ffff:127.0.0.1", tx.getsockname()[1])
    finally:
        rx.close()
        tx.close()


def test_count_and_slots(crecv: Any, v4: Any) -> None:
    rx, tx = v4
    payloads = [i.to_bytes(2, "big") for i in range(crecv.SLOTS + 6)]
    _send(tx, rx, payloads)
    first = crecv.recv_batch(rx.fileno(), 2)
    assert [d for d, _ in first] == payloads[:2]
    # asked for more than its slots: one call reads SLOTS at most, in order
    rest = crecv.recv_batch(rx.fileno(), 10_000)
    assert [d for d, _ in rest] == payloads[2 : 2 + crecv.SLOTS]
    assert [d for d, _ in crecv.recv_batch(rx.fileno(), 10_000)] == payloads[2 + crecv.SLOTS :]
    assert crecv.recv_batch(rx.fileno(), 0) == []
    assert crecv.recv_batch(rx.fileno(), -1) == []


def test_errors_are_recvfroms(crecv: Any) -> None:
    # a connected socket gets the ICMP port unreachable its datagram caused
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    gone = closed.getsockname()
    closed.close()
    for read in (_c_read(crecv), recvfrom_batch):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(gone)
            sock.send(b"anyone?")
            _wait(sock)
            with pytest.raises(ConnectionRefusedError):
                read(sock, 4)
            assert read(sock, 4) == []  # reported once
        finally:
            sock.close()
    bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = bad.fileno()
    bad.close()
    with pytest.raises(OSError):
        crecv.recv_batch(fd, 1)
    with pytest.raises(ValueError):
        crecv.recv_batch(-1, 1)
    with pytest.raises(TypeError):
        crecv.recv_batch(0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(max_size=1500), min_size=1, max_size=20))
def test_any_datagrams_come_back_as_sent(crecv: Any, v4: Any, payloads: list[bytes]) -> None:
    rx, tx = v4
    _send(tx, rx, payloads)
    assert _read_all(_c_read(crecv), rx, len(payloads)) == [(p, tx.getsockname()) for p in payloads]


@pytest.mark.parametrize("native", [True, False], ids=["recvmmsg", "recvfrom"])
def test_readable_reads_and_handles_what_waits(crecv: Any, v4: Any, native: bool) -> None:
    rx, tx = v4
    handled: list[tuple[bytes, Any]] = []
    errors: list[Exception] = []

    class _Loop:
        def call_soon(self, fn: Callable[[], None]) -> None:  # pragma: no cover - no handshakes
            raise AssertionError("only records here")

    reader = BatchReader(lambda d, a: handled.append((d, a)), _Loop(), lambda r: None)  # type: ignore[arg-type]
    reader.error_received = errors.append  # type: ignore[method-assign]
    reader.read_batch = (lambda s, n: crecv.recv_batch(s.fileno(), n)) if native else recvfrom_batch
    reader.sock = rx
    reader.readable(rx)  # nothing waiting: nothing handled, nothing raised
    assert handled == [] and errors == []
    records = [b"\xc0one", b"\xc0two", b"\xc0three"]
    _send(tx, rx, records)
    reader.readable(rx)  # one wake-up: all three, in order
    assert handled == [(r, tx.getsockname()) for r in records]
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    gone = closed.getsockname()
    closed.close()
    rx.connect(gone)
    rx.send(b"anyone?")
    _wait(rx)
    reader.readable(rx)  # the ICMP error reported, as asyncio's transport reports it
    assert len(errors) == 1 and isinstance(errors[0], ConnectionRefusedError)
