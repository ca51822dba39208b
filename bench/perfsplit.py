"""Where a listener's extra CPU goes, by library: ``perf`` samples of Synapse split per turn.

``bench/inbound.py --perf-out FILE`` runs one more pass per endpoint with Linux
``perf record`` sampling every thread of Synapse (``-k CLOCK_MONOTONIC``, so that a
sample's time compares with the bench's own ``time.monotonic()``), the CoAP+Noise and
HTTP/1.1 listeners taking turns of requests; :func:`split` gives each sample to the turn
it fell in and counts, per endpoint and listener, the samples of each group of shared
objects (:data:`GROUPS`: the Python interpreter, the modules compiled by mypyc, the
project's C, zlib, the AEAD's library, Synapse's Rust, the kernel, the C library, other
extension modules), as microseconds per request; :func:`render` writes the text.

cProfile and py-spy see Python functions only: the interpreter's own work (dictionary
probes, allocation, calls), the compiled modules, zlib and the kernel's share (system
calls, thread hand-offs) are where the listeners differ, and only a native sampler sees
them. A sample costs the process some CPU (perf's interrupt and bookkeeping), so the
figures are larger than the table's; the difference between the two listeners, measured
the same way in alternating turns, is the point. Sans-I/O: the caller runs ``perf``.
"""

from __future__ import annotations

import bisect
import collections
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

#: (group, how a shared object's file name starts): the first that matches; then any
#: other extension module (a name with :data:`EXTENSION_MARKS`) is in :data:`EXTENSIONS`
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Python interpreter", ("libpython", "python3")),
    ("compiled by mypyc (synapse-coap)", ("native__mypyc",)),
    (
        "synapse-coap C (_cenc, _cbody, _cdeflate, _caead)",
        ("_cenc.", "_cbody.", "_cdeflate.", "_caead."),
    ),
    ("zlib", ("libz.",)),
    ("AEAD (libsodium, or cryptography's Rust and OpenSSL)", ("libsodium.", "_rust.abi3")),
    ("Synapse's Rust", ("synapse_rust",)),
    ("kernel", ("[kernel",)),
    ("C library", ("libc.", "libm.", "ld-linux")),
)
EXTENSIONS = "other extension modules"
EXTENSION_MARKS = (".cpython-", ".abi3.")
OTHER = "other"
#: every group, in the order the text lists them
ALL_GROUPS = (*(g for g, _ in GROUPS), EXTENSIONS, OTHER)

_LINE = re.compile(r"^\s*(\d+)\s+([0-9.]+):\s+\S+\s+(.*?)\s+\((.*)\)\s*$")


@dataclass(frozen=True)
class Sample:
    tid: int
    time: float
    symbol: str
    dso: str


@dataclass(frozen=True)
class Turn:
    """``requests`` requests of ``listener`` to ``endpoint``, between ``start`` and
    ``end`` (CLOCK_MONOTONIC seconds)."""

    endpoint: str
    listener: str
    start: float
    end: float
    requests: int


@dataclass
class Cell:
    """One endpoint's and listener's samples, by group and by symbol, and its requests."""

    requests: int = 0
    groups: collections.Counter[str] = field(default_factory=collections.Counter)
    symbols: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: int = 0


def group_of(dso: str) -> str:
    """The group of a shared object (its path as perf prints it)."""
    name = dso.rsplit("/", 1)[-1]
    for group, prefixes in GROUPS:
        if name.startswith(prefixes):
            return group
    if any(mark in name for mark in EXTENSION_MARKS):
        return EXTENSIONS
    return OTHER


def parse_script(lines: Iterable[str]) -> Iterator[Sample]:
    """The samples of ``perf script -F tid,time,ip,sym,dso`` output (lines it cannot
    read, such as perf's own notes, are skipped)."""
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        yield Sample(int(m.group(1)), float(m.group(2)), m.group(3), m.group(4))


def split(samples: Iterable[Sample], turns: Sequence[Turn]) -> dict[tuple[str, str], Cell]:
    """Each sample counted in the cell of the turn it fell in (samples outside every
    turn are dropped); {(endpoint, listener): cell}. Turns must not overlap."""
    ordered = sorted(turns, key=lambda t: t.start)
    cells: dict[tuple[str, str], Cell] = {}
    for t in ordered:
        cells.setdefault((t.endpoint, t.listener), Cell()).requests += t.requests
    starts = [t.start for t in ordered]
    for s in samples:
        i = bisect.bisect_right(starts, s.time) - 1
        if i < 0 or s.time > ordered[i].end:
            continue
        t = ordered[i]
        cell = cells[(t.endpoint, t.listener)]
        cell.samples += 1
        group = group_of(s.dso)
        cell.groups[group] += 1
        cell.symbols[f"{s.symbol} [{group}]"] += 1
    return cells


def per_request(count: int, cell: Cell, frequency: float) -> float:
    """Microseconds per request that ``count`` samples at ``frequency`` Hz stand for."""
    return count / frequency * 1e6 / max(1, cell.requests)


def render(
    cells: dict[tuple[str, str], Cell],
    frequency: float,
    *,
    title: str,
    ours: str = "CoAP+Noise",
    theirs: str = "HTTP/1.1",
    symbols: int = 15,
    only: int = 25,
) -> list[str]:
    """Per endpoint: each group's microseconds per request for ``ours`` and ``theirs``
    and the difference, then the ``symbols`` functions whose difference is largest, then
    the ``only`` costliest functions that only ``ours`` ran (its own code: the compiled
    modules, its C, zlib, the AEAD; where the listeners' totals differ by less than
    their noise, as on the federation ``/send``, these are what a change of the
    listener's code moves)."""
    lines = [f"## {title}", ""]
    endpoints = sorted({e for e, _ in cells})
    for endpoint in endpoints:
        a, b = cells.get((endpoint, ours)), cells.get((endpoint, theirs))
        if a is None or b is None:
            continue
        lines.append(
            f"### {endpoint}: {a.requests} {ours} and {b.requests} {theirs} requests, "
            f"{a.samples} and {b.samples} samples"
        )
        lines.append(f"  {'us/request':<44} {ours:>11} {theirs:>11} {'difference':>11}")
        names = ALL_GROUPS
        total_a = total_b = 0.0
        for g in names:
            x = per_request(a.groups[g], a, frequency)
            y = per_request(b.groups[g], b, frequency)
            total_a, total_b = total_a + x, total_b + y
            if a.groups[g] or b.groups[g]:
                lines.append(f"  {g:<44} {x:11.1f} {y:11.1f} {x - y:+11.1f}")
        lines.append(f"  {'all':<44} {total_a:11.1f} {total_b:11.1f} {total_a - total_b:+11.1f}")
        diffs = sorted(
            set(a.symbols) | set(b.symbols),
            key=lambda k: (
                -abs(
                    per_request(a.symbols[k], a, frequency)
                    - per_request(b.symbols[k], b, frequency)
                )
            ),
        )
        lines.append(f"  the {symbols} functions that differ most (us/request, {ours} - {theirs}):")
        for k in diffs[:symbols]:
            x = per_request(a.symbols[k], a, frequency)
            y = per_request(b.symbols[k], b, frequency)
            lines.append(f"    {x - y:+7.1f}  {k}")
        mine = sorted((k for k in a.symbols if not b.symbols[k]), key=lambda k: -a.symbols[k])
        if mine and only:
            lines.append(f"  the {only} costliest functions only {ours} ran (us/request):")
            for k in mine[:only]:
                lines.append(f"    {per_request(a.symbols[k], a, frequency):7.1f}  {k}")
        lines.append("")
    return lines
