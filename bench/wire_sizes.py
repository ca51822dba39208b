"""Bytes per message over the corpus: HTTP/1.1 vs JSON vs each stage of the wire.

    .venv/bin/python bench/wire_sizes.py [--out bench/results/] [--profile N] [--corpus heldout]

For every request and response of the held-out corpus (tests/corpus/heldout/*.jsonl,
captured independently and never trained on; ``--corpus training`` reads
tests/corpus/*.jsonl instead) it prints, writes as CSV
(``wire_sizes.csv``) and plots (``wire_sizes.png``):

* ``http``: the HTTP/1.1 message as clients and Synapse send it (request or
  status line, the captured headers plus what the capture leaves out —
  Content-Length, Host for the live federation capture, and for the synthetic
  federation transactions Host/User-Agent/X-Matrix — and the JSON);
* ``json``: the JSON body; ``cbor``: generic CBOR; ``cbor_int``: CBOR with the
  profile's integer keys, value table and binary identifiers; ``deflate``: that
  raw-DEFLATEd; ``dict``: DEFLATE with the profile dictionary;
* ``coap``: the whole CoAP message (4-byte header, aiocoap's 2-byte token,
  options, payload) with the sticky token already bound.

Each message is encoded with the WireContext its session would have: a live
federation record's ``servers`` (responder first) when it has them, else
``corpus.example.org`` for the client capture and the remote/origin pair for
the synthetic federation transactions.

Then the medians and the three size targets (message send <= 64 B, its
response <= 48 B, a federation transaction with one m.room.message <= 45 % of
its JSON body).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synapse_coap.mapping import samples  # noqa: E402
from synapse_coap.mapping.codec import WireCodec  # noqa: E402
from synapse_coap.mapping.messages import HttpRequest, HttpResponse  # noqa: E402
from synapse_coap.mapping.tokens import SenderTokens  # noqa: E402
from synapse_coap.wire.body import encode_stages  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.profile import load_profile, profile_ids  # noqa: E402

COLUMNS = ["http", "json", "cbor", "cbor_int", "deflate", "dict", "coap"]
REMOTE = "remote.example.org"
REASONS = {200: "OK", 201: "Created", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


def _json_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _http_size(first_line: str, headers: list[tuple[str, str]], body: bytes) -> int:
    names = {k.lower() for k, _ in headers}
    if body and "content-length" not in names and "transfer-encoding" not in names:
        headers = [*headers, ("Content-Length", str(len(body)))]
    head = first_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return len(head.encode()) + len(body)


CORPORA = {"heldout": ROOT / "tests" / "corpus" / "heldout", "training": ROOT / "tests" / "corpus"}


def rows(profile_id: int, corpus: str = "heldout") -> list[dict[str, Any]]:
    profile = load_profile(profile_id)
    out: list[dict[str, Any]] = []
    for path in sorted(CORPORA[corpus].glob("*.jsonl")):
        federation = path.stem == "federation"
        for i, line in enumerate(path.read_text().splitlines()):
            entry = json.loads(line)
            q, r = entry["request"], entry.get("response")
            headers = [(k, v) for k, v in q["headers"]]
            if entry.get("servers"):
                # A live capture: the session's own server names, responder first,
                # and the real X-Matrix header; HTTP adds the Host line.
                ctx = WireContext(tuple(entry["servers"]))
                if not any(k.lower() == "host" for k, _ in headers):
                    headers = [("Host", entry["servers"][0]), *headers]
            elif federation:
                origin = (
                    q["body"].get("origin", "origin.example") if q["body"] else "origin.example"
                )
                ctx = WireContext((REMOTE, origin))
                headers = [
                    ("Host", REMOTE),
                    ("User-Agent", "Synapse/1.163.2"),
                    ("Authorization", samples.x_matrix(origin, REMOTE, seed=i)),
                    *headers,
                ]
            else:
                ctx = WireContext(("corpus.example.org",))
            codec = WireCodec(profile, ctx)
            body = _json_bytes(q["body"])
            req = HttpRequest(q["method"], q["target"].encode(), headers, body)
            tokens = SenderTokens()
            if (req.header("authorization") or "").startswith("Bearer "):
                tokens.acknowledge(codec.encode_request(req, tokens))
            row = _row(
                f"{path.stem}:{entry['name']}", "request", codec, ctx, profile, q["body"], body
            )
            row["http"] = _http_size(f"{q['method']} {q['target']} HTTP/1.1", headers, body)
            row["coap"] = samples.datagram_size(codec.encode_request(req, tokens))
            out.append(row)
            if r:
                rbody = _json_bytes(r["body"])
                if not r["headers"] and r["body"] is not None:
                    # The federation capture kept no response headers; Synapse sends these.
                    r["headers"] = [
                        ["Server", "Synapse/1.163.2"],
                        ["Date", "Sun, 22 Nov 2026 04:27:54 GMT"],
                        ["Content-Type", "application/json"],
                        ["Cache-Control", "no-cache, no-store, must-revalidate"],
                    ]
                resp = HttpResponse(r["status"], [(k, v) for k, v in r["headers"]], rbody)
                row = _row(
                    f"{path.stem}:{entry['name']}",
                    "response",
                    codec,
                    ctx,
                    profile,
                    r["body"],
                    rbody,
                )
                reason = r.get("reason") or REASONS.get(r["status"], "")
                rheaders = [(k, v) for k, v in r["headers"] if k.lower() != "transfer-encoding"]
                row["http"] = _http_size(f"HTTP/1.1 {r['status']} {reason}", rheaders, rbody)
                row["coap"] = samples.datagram_size(codec.encode_response(resp))
                out.append(row)
    return out


def _row(
    name: str, kind: str, codec: WireCodec, ctx: WireContext, profile: Any, value: Any, body: bytes
) -> dict[str, Any]:
    row: dict[str, Any] = {"message": name, "kind": kind, "json": len(body)}
    if value is not None:
        stages = encode_stages(value, profile, ctx)
        row.update(
            cbor=len(stages["cbor"]),
            cbor_int=len(stages["cbor_int_keys"]),
            deflate=len(stages["deflate"]) + 1,
            dict=len(stages["dictionary"]) + 1,
        )
    else:
        row.update(cbor=0, cbor_int=0, deflate=0, dict=0)
    return row


def targets(profile_id: int) -> dict[str, Any]:
    profile = load_profile(profile_id)
    codec = WireCodec(profile, WireContext((samples.SERVER,)))
    tokens = SenderTokens()
    req = samples.send_request(0, token="syt_token")
    tokens.acknowledge(codec.encode_request(req, tokens))
    send = samples.datagram_size(codec.encode_request(req, tokens))
    resp = samples.datagram_size(codec.encode_response(samples.send_response(0)))
    fed: dict[str, Any] = {}
    last_in_room: dict[str, tuple[dict[str, Any], str]] = {}  # for the warm-session number
    for line in (ROOT / "tests" / "corpus" / "federation.jsonl").read_text().splitlines():
        e = json.loads(line)
        body = e["request"].get("body")
        pdus = body.get("pdus") if isinstance(body, dict) else None
        if e["name"] == "federation.send.m.room.message" and len(e["request"]["body"]["pdus"]) == 1:
            txn = e["request"]["body"]
            fcodec = WireCodec(profile, WireContext((REMOTE, txn["origin"])))
            freq = samples.federation_send(txn, e["request"]["target"], REMOTE)
            msg = fcodec.encode_request(freq)
            fed = {
                "json": len(freq.body),
                "payload": len(msg.payload),
                "coap": samples.datagram_size(msg),
            }
            prev = last_in_room.get(txn["pdus"][0].get("room_id", ""))
            if prev is not None:  # a Noise session where the previous txn was acknowledged
                preq = samples.federation_send(prev[0], prev[1], REMOTE, seed=1)
                warm = samples.warm_session_request(fcodec, preq, freq)
                fed["warm"] = samples.datagram_size(warm)
            break
        if pdus and len(pdus) == 1 and isinstance(pdus[0], dict) and pdus[0].get("room_id"):
            last_in_room[pdus[0]["room_id"]] = (body, e["request"]["target"])
    return {"send_request": send, "send_response": resp, "federation": fed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="output directory"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=None,
        help="wire profile (default: the highest installed, the one peers negotiate)",
    )
    parser.add_argument(
        "--corpus",
        choices=sorted(CORPORA),
        default="heldout",
        help="heldout (default: never trained on) or training",
    )
    args = parser.parse_args(argv)
    if args.profile is None:
        args.profile = max(profile_ids())
    print(
        f"profile {args.profile}, corpus {args.corpus} ({CORPORA[args.corpus].relative_to(ROOT)})"
    )
    data = rows(args.profile, args.corpus)
    width = max(len(r["message"]) for r in data)
    print(f"{'message':<{width}} {'kind':<8} " + " ".join(f"{c:>8}" for c in COLUMNS))
    for r in data:
        print(f"{r['message']:<{width}} {r['kind']:<8} " + " ".join(f"{r[c]:>8}" for c in COLUMNS))
    medians: dict[str, dict[str, float]] = {}
    for kind in ("request", "response"):
        # over messages that have a body, so every column describes the same messages
        sel = [r for r in data if r["kind"] == kind and r["json"] > 0]
        medians[kind] = {c: statistics.median(r[c] for r in sel) for c in COLUMNS}
        print(
            f"{'MEDIAN':<{width}} {kind:<8} "
            + " ".join(f"{medians[kind][c]:>8.0f}" for c in COLUMNS)
        )
    t = targets(args.profile)
    f = t["federation"]
    print()
    print(
        f"size target: client message send       {t['send_request']:>4} B  (target <= {samples.REQUEST_TARGET_BYTES})"
    )
    print(
        f"size target: its 200 response          {t['send_response']:>4} B  (target <= {samples.RESPONSE_TARGET_BYTES})"
    )
    if f:
        print(
            f"size target: federation send, 1 PDU    body {f['payload']} B = {f['payload'] / f['json']:.1%} of "
            f"{f['json']} B JSON; whole CoAP message {f['coap']} B = {f['coap'] / f['json']:.1%} "
            f"(target <= {samples.FEDERATION_TARGET_RATIO:.0%})"
        )
    if "warm" in f:
        print(
            f"size target: federation send, warm     whole CoAP message {f['warm']} B = "
            f"{f['warm'] / f['json']:.1%} (previous txn in the room acknowledged: string table)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "wire_sizes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["message", "kind", *COLUMNS])
        w.writeheader()
        w.writerows(data)
    _plot(data, medians, t, args.out / "wire_sizes.png")
    print(f"\nwrote {args.out / 'wire_sizes.csv'} and {args.out / 'wire_sizes.png'}")
    return 0


def _plot(
    data: list[dict[str, Any]], medians: dict[str, dict[str, float]], t: dict[str, Any], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [
        "HTTP/1.1",
        "JSON",
        "CBOR",
        "CBOR\nint keys",
        "+DEFLATE",
        "+dictionary",
        "CoAP\nmessage",
    ]
    x = range(len(COLUMNS))
    for offset, kind, color in ((-0.2, "request", "#4c72b0"), (0.2, "response", "#dd8452")):
        vals = [medians[kind][c] for c in COLUMNS]
        bars = ax1.bar(
            [i + offset for i in x], vals, width=0.4, label=f"{kind}s (median)", color=color
        )
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("bytes per message (median over messages with a JSON body)")
    ax1.set_title(f"Matrix corpus, {len(data)} messages")
    ax1.legend()
    f = t["federation"]
    names = ["message send\n(request)", "its 200\nresponse", "federation txn\n1 PDU"]
    got = [t["send_request"], t["send_response"], f.get("coap", 0)]
    limit = [
        samples.REQUEST_TARGET_BYTES,
        samples.RESPONSE_TARGET_BYTES,
        samples.FEDERATION_TARGET_RATIO * f.get("json", 0),
    ]
    bars = ax2.bar(names, got, color="#55a868", label="whole CoAP message")
    ax2.bar_label(bars, fmt="%d B", fontsize=9)
    ax2.scatter(names, limit, marker="_", s=2000, color="#c44e52", label="target", zorder=3)
    if f:
        ax2.bar(names[2:], [f["payload"]], color="#8172b2", width=0.4, label="federation body only")
    ax2.set_title("size targets")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
