"""What the listener's codec work costs with the CPU's caches cold, as inside a homeserver.

    .venv/bin/python bench/cold_codec.py [--rounds 5] [--calls 200] [--out CSV]

A federation ``/send`` costs Synapse some 13 ms of CPU, and between two of them its own
work evicts the listener's code and data from the CPU's caches: in Synapse, the stage
timers (``bench/inbound.py --stages-out F --stages-endpoint "federation send (1 PDU)"``)
put each part of the CoAP+Noise path at about ten times what it costs in a loop. This
bench times the codec's parts of that path both ways, one call at a time, on distinct
one-PDU transactions (the corpus's, each with another text, timestamp and transaction
id, so that no memo hits) and on their answers:

* ``hot``: the calls back to back (what a loop, or bench/codec.py, measures);
* ``cold``: each call after reading 32 MiB (``zlib.crc32``), which evicts the CPU's data
  caches (a homeserver's work also evicts code, branch history and the interpreter's
  caches: in Synapse the parts cost more still).

Each round gives the median of ``--calls`` calls; the report shows the median (min-max)
of ``--rounds`` rounds, microseconds per call, and writes them to ``--out`` (default
``bench/results/cold_codec.csv``) with the command, commit and machine. The C writer's
rows (``wire/_cbody.c``: a request body's JSON text for Synapse, a PDU's content hash)
stand beside what they replace (Python's json; json, hashlib and binascii), as do the
C walk's rows for a request's identifiers (the session string table's; also on a
50-PDU transaction). The last rows are the listener's socket read of a wake-up with
one datagram waiting (a lone request's) and with 64 (a busy listener's), ``recvfrom``
until it fails against the native build's one ``recvmmsg`` call
(``transport/_crecv.c``). Between them: the ``/send``'s answer as it is (its event id
new to the session's table), the proof that its DEFLATE cannot win (C, and the
compiled Python reference) against the DEFLATE run it saves, and a request body's
inflate through the kept stream against a zlib decompressobj per body.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import select
import socket
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from codec import transaction  # noqa: E402
from results_store import provenance, rounds_calls_args, spread, write_dict_rows  # noqa: E402

from synapse_coap.mapping import samples  # noqa: E402
from synapse_coap.mapping.codec import WireCodec  # noqa: E402
from synapse_coap.mapping.jsonbody import dump_json, dump_json_python  # noqa: E402
from synapse_coap.mapping.messages import HttpResponse  # noqa: E402
from synapse_coap.transport import batch  # noqa: E402
from synapse_coap.wire import body_fast, body_tables, deflate, strings  # noqa: E402
from synapse_coap.wire.body_encode import _encode_cbor, encode_body  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.deflate import _deflate  # noqa: E402
from synapse_coap.wire.profile import load_profile, profile_ids  # noqa: E402

REMOTE = "remote.example.org"
SWEEP = bytes(32 << 20)
PUT = 3  # CoAP PUT: a /send's answer is 2.04


def _evict() -> None:
    zlib.crc32(SWEEP)


def _median_us(
    fn: Callable[[Any], object],
    inputs: Sequence[Any],
    cold: bool,
    prepare: Callable[[Any], object] | None = None,
) -> float:
    times: list[int] = []
    for x in inputs:
        if prepare is not None:
            prepare(x)
        if cold:
            _evict()
        t = time.perf_counter_ns()
        fn(x)
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


class _Wakeup:
    """A loopback UDP socket with datagrams waiting, sent untimed: :meth:`arrive` one
    (a lone request's wake-up), :meth:`flood` a busy listener's."""

    def __init__(self) -> None:
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.bind(("127.0.0.1", 0))
        self.rx.setblocking(False)
        self.to = self.rx.getsockname()
        self.record = bytes(300)

    def arrive(self, _x: object) -> None:
        self.tx.sendto(self.record, self.to)
        select.select([self.rx], [], [], 5.0)

    def flood(self, _x: object) -> None:
        """:data:`~synapse_coap.transport.batch.DRAIN_MAX` datagrams waiting (a busy
        listener's wake-up)."""
        for _ in range(batch.DRAIN_MAX):
            self.tx.sendto(self.record, self.to)
        select.select([self.rx], [], [], 5.0)


def read_cases(calls: int) -> list[tuple[str, Callable[[Any], object], list[Any], Any]]:
    """(name, function, its inputs, what each call needs first): a wake-up's read of
    what waits (one datagram, then :data:`~synapse_coap.transport.batch.DRAIN_MAX`), as
    the listener reads it (``transport/batch.py``)."""
    w = _Wakeup()
    rows: list[tuple[str, Callable[[Any], object], list[Any], Any]] = []
    for what, prepare in (("one datagram", w.arrive), (f"{batch.DRAIN_MAX} datagrams", w.flood)):
        rows.append(
            (
                f"socket read, {what} waiting: recvfrom each, then the failing one",
                lambda _x: batch.recvfrom_batch(w.rx, batch.DRAIN_MAX),
                [None] * calls,
                prepare,
            )
        )
        if batch._CRECV is not None:
            rows.append(
                (
                    f"  {what}: one recvmmsg call (transport/_crecv.c)",
                    lambda _x: batch.recvmmsg_batch(w.rx, batch.DRAIN_MAX),
                    [None] * calls,
                    prepare,
                )
            )
    return rows


def cases(calls: int) -> list[tuple[str, Callable[[Any], object], list[Any]]]:
    """(name, function, its inputs): the /send's request decode and its parts, its answer."""
    profile = load_profile(max(profile_ids()))
    txn = transaction()
    codec = WireCodec(profile, WireContext(("bench.test", str(txn["origin"]))))
    msgs, values, pdus, answers = [], [], [], []
    for i in range(calls):
        t = json.loads(json.dumps(txn))
        t["origin_server_ts"] = int(t["origin_server_ts"]) + i
        pdu = t["pdus"][0]
        pdu["content"] = {**pdu.get("content", {}), "body": f"cold path {i}"}
        pdu["hashes"] = {"sha256": body_tables.content_hash(pdu)}
        req = samples.federation_send(t, f"/_matrix/federation/v1/send/cold{i}", REMOTE)
        msgs.append(codec.encode_request(req))
        values.append(json.loads(req.body))
        pdus.append(pdu)
        body = json.dumps({"pdus": {f"$cold{i}": {}}}).encode()
        answers.append(HttpResponse(200, (("content-type", "application/json"),), body))
    c = body_fast._C
    targets = [f"/_matrix/federation/v1/send/cold{i}".encode() for i in range(calls)]
    pairs = list(zip(targets, values, strict=True))  # (target, value) of each request
    rows: list[tuple[str, Callable[[Any], object], list[Any]]] = [
        ("request decode (/send, 1 PDU)", codec.decode_request, msgs),
        (
            "  its identifiers for the string table: compiled Python's walk",
            lambda tv: strings.python_request_identifiers(*tv),
            pairs,
        ),
        ("  its JSON text: json.dumps", dump_json_python, values),
        (
            "  its PDU's content hash: json, hashlib, binascii",
            body_tables.python_content_hash,
            pdus,
        ),
    ]
    if c is not None:
        rows += [
            ("  its JSON text: the C writer", dump_json, values),
            ("  its PDU's content hash: the C writer", c.content_hash, pdus),
        ]
    # (request_identifiers walks in C where _cbody.c has request_strings, else in Python)
    walk_c = strings._C_REQUEST_STRINGS is not None
    if walk_c:
        rows.append(
            (
                "  its identifiers for the string table: the C walk",
                lambda tv: strings.request_identifiers(*tv),
                pairs,
            )
        )
    # a catch-up transaction: 50 PDUs, each with its own text
    many = [
        (
            t,
            {
                **v,
                "pdus": [{**v["pdus"][0], "content": {"body": f"text {i} {j}"}} for j in range(50)],
            },
        )
        for i, (t, v) in enumerate(pairs)
    ]
    rows.append(
        (
            "identifiers of a 50-PDU transaction: compiled Python's walk",
            lambda tv: strings.python_request_identifiers(*tv),
            many,
        )
    )
    if walk_c:
        rows.append(
            (
                "  the C walk",
                lambda tv: strings.request_identifiers(*tv),
                many,
            )
        )
    rows.append(
        ("answer encode (/send's answer)", lambda r: codec.encode_response(r, method=PUT), answers)
    )
    # where the request named the event id (not a PDU of room version 3 or later, whose
    # id the server computes), the answer's id is a reference into the session string
    # table: its body is 6-7 bytes of CBOR, which no DEFLATE form can shorten
    # (wire.deflate.cannot_shrink); the run the encoder no longer makes beside it
    referenced = [({"pdus": {f"$cold{i}": {}}}, {f"$cold{i}": (4, i % 64)}) for i in range(calls)]
    raws = [_encode_cbor(v, profile, codec.context, refs) for v, refs in referenced]
    rows += [
        (
            "answer body encode, its event id a reference",
            lambda vr: encode_body(vr[0], profile, codec.context, vr[1]),
            referenced,
        ),
        (
            "  the DEFLATE run it skips (6-7 bytes)",
            lambda raw: _deflate(raw, profile.dictionary),
            raws,
        ),
    ]
    # the answer as the /send's really is: its event id is the server's, new to the
    # session's table, so its 32-byte hash goes as it is (37-40 bytes of CBOR), which
    # DEFLATE never shortens; the proof that it cannot (deflate.cannot_shrink, in C
    # where the native build runs) against the run it saves
    fresh = [
        {
            "pdus": {
                "$" + base64.urlsafe_b64encode(hashlib.sha256(b"%d" % i).digest()).decode()[:43]: {}
            }
        }
        for i in range(calls)
    ]
    fresh_raws = [_encode_cbor(v, profile, codec.context, None) for v in fresh]
    rows += [
        (
            "answer body encode, its event id new to the table",
            lambda v: encode_body(v, profile, codec.context),
            fresh,
        ),
        (
            "  the proof its DEFLATE cannot win",
            lambda raw: deflate.cannot_shrink(raw, profile.dictionary),
            fresh_raws,
        ),
        (
            "  the proof in compiled Python",
            lambda raw: deflate.python_cannot_shrink(raw, profile.dictionary),
            fresh_raws,
        ),
        (
            "  the DEFLATE run it skips (37-40 bytes)",
            lambda raw: _deflate(raw, profile.dictionary),
            fresh_raws,
        ),
    ]
    # the request's body inflated: one kept stream in C (native build) against a zlib
    # decompressobj per body (what zlib's module does, and the plain-Python sources)
    # (the transactions' CBOR with the profile dictionary's DEFLATE, as a request whose
    # DEFLATE form wins is sent: these few-hundred-byte ones go as CBOR, it saves little)
    streams = [
        _deflate(_encode_cbor(v, profile, codec.context, None), profile.dictionary) for v in values
    ]
    cap = 1 << 20
    rows.append(
        ("request body inflate", lambda d: deflate.inflate(d, profile.dictionary, cap), streams)
    )
    rows.append(
        (
            "  with a decompressobj per body",
            lambda d: zlib.decompressobj(-15, zdict=profile.dictionary).decompress(d, cap),
            streams,
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = rounds_calls_args(
        ap,
        argv,
        calls_help="calls per case, round and way",
        out=ROOT / "bench" / "results" / "cold_codec.csv",
    )
    meta = provenance(
        "python bench/cold_codec.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    rows = [(*row, None) for row in cases(args.calls)] + read_cases(args.calls)
    got: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", file=sys.stderr)
        for name, fn, inputs, prepare in rows:
            for way in ("hot", "cold"):
                got.setdefault((name, way), []).append(
                    _median_us(fn, inputs, way == "cold", prepare)
                )
    out = []
    print(f"\nmicroseconds per call, median (min-max) of {args.rounds} rounds of {args.calls}")
    width = max(len(row[0]) for row in rows)
    print(f"{'':{width}} {'hot':>22} {'cold':>22}")
    for name, _fn, _inputs, _prepare in rows:
        hot, cold = got[(name, "hot")], got[(name, "cold")]
        print(f"{name:{width}} {spread(hot, '{:.1f}'):>22} {spread(cold, '{:.1f}'):>22}")
        for way, xs in (("hot", hot), ("cold", cold)):
            out += [
                {"case": name.strip(), "way": way, "round": i, "us": f"{x:.2f}"}
                for i, x in enumerate(xs)
            ]
    write_dict_rows(args.out, out, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
