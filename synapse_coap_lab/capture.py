"""IP-level byte counting of loopback traffic with tshark.

Used to count both stacks the same way (CoAP/UDP through the relay, and
HTTPS/TCP) for the benchmarks: every IP packet, headers included, TCP
ACK-only segments included.

On Linux the loopback interface captures as Ethernet (``EN10MB``) with a
14-byte header of zero MAC addresses; the IP size of a packet is read from
the IP header itself (``ip.len`` for IPv4, ``ipv6.plen + 40`` for IPv6), so
the link header never enters the counts whatever the link type.

Example::

    with LoopbackCapture("tcp port 8448") as cap:
        ... run the scenario ...
    print(cap.counts(server_port=8448))

Capturing needs root or a ``dumpcap`` with the capture capabilities. When
tshark is missing, :func:`tshark_path` returns ``None`` and callers fall back
to relay accounting (UDP) and socket/segment estimates (TCP); see docs/lab.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

logger = logging.getLogger(__name__)

__all__ = [
    "CaptureCounts",
    "CaptureError",
    "LoopbackCapture",
    "Packet",
    "estimate_tcp",
    "read_packets",
    "summarize",
    "tshark_path",
]

_FIELDS = (
    "frame.time_relative",
    "ip.len",
    "ipv6.plen",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.len",
    "tcp.flags.syn",
    "tcp.flags.fin",
    "tcp.flags.reset",
    "udp.srcport",
    "udp.dstport",
)


class CaptureError(RuntimeError):
    """tshark is missing or could not capture (permissions, interface)."""


def tshark_path() -> str | None:
    """The tshark executable (``$SYNAPSE_COAP_TSHARK`` or on ``$PATH``), or ``None``."""
    explicit = os.environ.get("SYNAPSE_COAP_TSHARK")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("tshark")


@attrs.frozen
class Packet:
    """One captured IP packet."""

    time: float
    ip_bytes: int
    proto: str  # "tcp", "udp" or "other"
    src_port: int | None
    dst_port: int | None
    tcp_payload: int | None = None
    syn: bool = False
    fin: bool = False
    rst: bool = False

    @property
    def ack_only(self) -> bool:
        """A TCP segment with no payload and no SYN/FIN/RST (a pure ACK)."""
        return (
            self.proto == "tcp" and not self.tcp_payload and not (self.syn or self.fin or self.rst)
        )


@attrs.frozen
class CaptureCounts:
    """Totals over a capture. ``to_server`` / ``from_server`` split by the
    server port when one was given (else everything is in ``to_server``)."""

    packets: int
    ip_bytes: int
    to_server_packets: int
    to_server_ip_bytes: int
    from_server_packets: int
    from_server_ip_bytes: int
    tcp_segments: int
    tcp_ack_only: int
    tcp_handshake: int  # segments with SYN
    udp_datagrams: int
    duration: float

    def as_dict(self) -> dict[str, int | float]:
        return attrs.asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.packets} packets, {self.ip_bytes} B IP (to server {self.to_server_packets}/"
            f"{self.to_server_ip_bytes} B, from server {self.from_server_packets}/"
            f"{self.from_server_ip_bytes} B), tcp {self.tcp_segments} segments "
            f"({self.tcp_ack_only} ACK-only, {self.tcp_handshake} SYN), "
            f"udp {self.udp_datagrams} datagrams"
        )


def _first_int(text: str) -> int | None:
    text = text.split(",", 1)[0].strip()
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _flag(text: str) -> bool:
    value = text.split(",", 1)[0].strip().lower()
    return value in ("1", "true")


def parse_fields(lines: Iterable[str]) -> list[Packet]:
    """Parse ``tshark -T fields`` output (tab separated, in ``_FIELDS`` order)."""
    packets: list[Packet] = []
    for line in lines:
        cols = line.rstrip("\n").split("\t")
        if len(cols) < len(_FIELDS):
            cols += [""] * (len(_FIELDS) - len(cols))
        (t, ip_len, ip6_plen, tsp, tdp, tlen, syn, fin, rst, usp, udp_) = cols[: len(_FIELDS)]
        v4 = _first_int(ip_len)
        v6 = _first_int(ip6_plen)
        if v4 is not None:
            ip_bytes = v4
        elif v6 is not None:
            ip_bytes = v6 + 40
        else:
            continue  # not IP (e.g. ARP): not counted
        try:
            when = float(t or 0.0)
        except ValueError:
            when = 0.0
        if _first_int(tsp) is not None:
            packets.append(
                Packet(
                    when,
                    ip_bytes,
                    "tcp",
                    _first_int(tsp),
                    _first_int(tdp),
                    _first_int(tlen) or 0,
                    _flag(syn),
                    _flag(fin),
                    _flag(rst),
                )
            )
        elif _first_int(usp) is not None:
            packets.append(Packet(when, ip_bytes, "udp", _first_int(usp), _first_int(udp_)))
        else:
            packets.append(Packet(when, ip_bytes, "other", None, None))
    return packets


def read_packets(pcap: Path, *, display_filter: str | None = None) -> list[Packet]:
    """Read a capture file with tshark."""
    tshark = tshark_path()
    if tshark is None:
        raise CaptureError("tshark is not installed")
    cmd = [tshark, "-n", "-r", str(pcap), "-T", "fields", "-E", "separator=/t"]
    for field in _FIELDS:
        cmd += ["-e", field]
    if display_filter:
        cmd += ["-Y", display_filter]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise CaptureError(f"tshark -r failed: {proc.stderr.strip()}")
    return parse_fields(proc.stdout.splitlines())


def summarize(packets: Iterable[Packet], server_port: int | None = None) -> CaptureCounts:
    """Totals, split by direction relative to ``server_port`` when given."""
    pk = list(packets)
    to_p = to_b = from_p = from_b = 0
    for p in pk:
        if server_port is not None and p.src_port == server_port:
            from_p += 1
            from_b += p.ip_bytes
        else:
            to_p += 1
            to_b += p.ip_bytes
    times = [p.time for p in pk]
    return CaptureCounts(
        packets=len(pk),
        ip_bytes=sum(p.ip_bytes for p in pk),
        to_server_packets=to_p,
        to_server_ip_bytes=to_b,
        from_server_packets=from_p,
        from_server_ip_bytes=from_b,
        tcp_segments=sum(1 for p in pk if p.proto == "tcp"),
        tcp_ack_only=sum(1 for p in pk if p.ack_only),
        tcp_handshake=sum(1 for p in pk if p.syn),
        udp_datagrams=sum(1 for p in pk if p.proto == "udp"),
        duration=(max(times) - min(times)) if times else 0.0,
    )


def estimate_tcp(
    *,
    to_server_bytes: int,
    from_server_bytes: int,
    to_server_writes: int = 1,
    from_server_writes: int = 1,
    connections: int = 1,
    mss: int = 1448,
    ipv6: bool = False,
) -> CaptureCounts:
    """Estimate IP-level TCP traffic from socket accounting (when no capture tool exists).

    Linux defaults are assumed: timestamps on (12 option bytes per segment),
    SYN and SYN-ACK with 20 more option bytes, a three-segment teardown, each
    write sent as ``ceil(bytes / mss)`` segments, and one ACK-only segment per
    data *write* received (delayed ACKs coalesce the segments of one write).
    For one request and one response per connection this matches a loopback
    capture exactly; with many small writes it is an upper bound.
    """
    header = (60 if ipv6 else 40) + 12
    syn = header + 8

    def segments(total: int, writes: int) -> int:
        if total <= 0:
            return 0
        per_write = -(-total // max(1, writes))
        return max(1, writes) * -(-per_write // mss)

    up_segments = segments(to_server_bytes, to_server_writes)
    down_segments = segments(from_server_bytes, from_server_writes)
    up_acks = min(from_server_writes, down_segments)
    down_acks = min(to_server_writes, up_segments)
    # handshake: SYN (up), SYN-ACK (down), ACK (up); teardown: FIN, FIN, ACK
    to_p = up_segments + up_acks + connections * (2 + 2)
    from_p = down_segments + down_acks + connections * (1 + 1)
    to_b = to_server_bytes + header * (up_segments + up_acks) + connections * (syn + header * 3)
    from_b = from_server_bytes + header * (down_segments + down_acks) + connections * (syn + header)
    return CaptureCounts(
        packets=to_p + from_p,
        ip_bytes=to_b + from_b,
        to_server_packets=to_p,
        to_server_ip_bytes=to_b,
        from_server_packets=from_p,
        from_server_ip_bytes=from_b,
        tcp_segments=to_p + from_p,
        tcp_ack_only=up_acks + down_acks + connections * 2,
        tcp_handshake=connections * 2,
        udp_datagrams=0,
        duration=0.0,
    )


class LoopbackCapture:
    """Capture packets matching a BPF ``capture_filter`` on loopback into a pcapng.

    :meth:`start` returns once tshark reports the capture is running;
    :meth:`stop` ends it (SIGINT, so tshark flushes the file). Read the
    result with :meth:`packets` or :meth:`counts`.
    """

    def __init__(
        self,
        capture_filter: str,
        *,
        interface: str = "lo",
        directory: Path | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.capture_filter = capture_filter
        self.interface = interface
        self.start_timeout = start_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="synapse-coap-capture-")
            directory = Path(self._tmp.name)
        self.pcap = directory / "capture.pcapng"
        self._log = directory / "tshark.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        tshark = tshark_path()
        if tshark is None:
            raise CaptureError("tshark is not installed")
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    tshark,
                    "-n",
                    "-i",
                    self.interface,
                    "-f",
                    self.capture_filter,
                    "-w",
                    str(self.pcap),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            text = self._log.read_text(errors="replace")
            if "Capturing on" in text:
                time.sleep(0.2)  # let dumpcap's filter settle
                return
            if self._proc.poll() is not None:
                raise CaptureError(f"tshark could not capture on {self.interface}: {text.strip()}")
            time.sleep(0.02)
        self._kill()
        raise CaptureError(f"tshark did not start capturing within {self.start_timeout} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        time.sleep(0.2)  # let the last packets reach the capture buffer
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def packets(self, display_filter: str | None = None) -> list[Packet]:
        return read_packets(self.pcap, display_filter=display_filter)

    def counts(
        self, server_port: int | None = None, display_filter: str | None = None
    ) -> CaptureCounts:
        return summarize(self.packets(display_filter), server_port)

    def cleanup(self) -> None:
        self._kill()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LoopbackCapture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
