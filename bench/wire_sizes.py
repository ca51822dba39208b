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
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_store import provenance, replace_block, write_dict_rows  # noqa: E402

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
    parser.add_argument(
        "--readme", action="store_true", help="rewrite the README's wire-size block"
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
    meta = provenance("python bench/wire_sizes.py " + " ".join(argv or sys.argv[1:]))
    meta["profile"] = str(args.profile)
    meta["corpus"] = str(CORPORA[args.corpus].relative_to(ROOT))
    write_dict_rows(args.out / "wire_sizes.csv", data, meta)
    if args.readme:
        base = {
            k: statistics.median(
                r["dict"] for r in rows(1, args.corpus) if r["kind"] == k and r["json"] > 0
            )
            for k in ("request", "response")
        }
        t1 = targets(1)
        replace_block(
            ROOT / "README.md",
            "wire-sizes",
            readme_block(args, medians, t, base, t1, meta),
            "bench/wire_sizes.py --readme",
        )
        print("updated README.md")
    _plot(data, medians, t, args.out / "wire_sizes.png")
    print(f"\nwrote {args.out / 'wire_sizes.csv'} and {args.out / 'wire_sizes.png'}")
    return 0


def renamed_totals(corpus: str, profiles: tuple[int, ...]) -> dict[str, dict[int, int]]:
    """Bytes ``encode_body`` sends over the corpus's bodies per profile: as captured, and with
    every user, server, alias, key id and device id renamed (one consistent mapping, seeded),
    as another deployment's traffic would be: the fair test of a dictionary."""
    import importlib.machinery
    import importlib.util
    import random

    from synapse_coap.wire.body import encode_body

    loader = importlib.machinery.SourceFileLoader(
        "build_maps", str(ROOT / "scripts" / "build-maps")
    )
    spec = importlib.util.spec_from_loader("build_maps", loader)
    assert spec is not None
    bm = importlib.util.module_from_spec(spec)
    loader.exec_module(bm)
    samples_ = bm.corpus_samples(CORPORA[corpus])
    names = sorted(bm.corpus_names(samples_), key=lambda n: (-len(n), n))
    rng = random.Random(7)
    fresh: dict[str, str] = {}
    out: dict[str, dict[int, int]] = {"as captured": {}, "renamed": {}}
    for variant, tot in out.items():
        for pid in profiles:
            tot[pid] = 0
        for _, body, servers in samples_:
            if variant == "renamed":
                body = bm.neutralise(body, names, rng, "", fresh)
                servers = tuple(bm.neutralise(x, names, rng, "", fresh) for x in servers)
            for pid in profiles:
                tot[pid] += len(encode_body(body, load_profile(pid), WireContext(servers)))
    return out


def readme_block(
    args: argparse.Namespace,
    medians: dict[str, dict[str, float]],
    t: dict[str, Any],
    base: dict[str, float],
    t1: dict[str, Any],
    meta: dict[str, str],
) -> str:
    """The README's wire-size table and size targets (held-out corpus, negotiated profile)."""
    corpus = CORPORA[args.corpus].relative_to(ROOT)
    head = (
        "| | HTTP/1.1 | JSON body | CBOR | CBOR, integer keys | + DEFLATE | + dictionary "
        "| whole CoAP message | + dictionary, profile 1 |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    lines = [
        f"Over `{corpus}/*.jsonl` ({'captured independently, never trained on' if args.corpus == 'heldout' else 'the training run'}), "
        f"profile {args.profile}, median bytes per message with a JSON body (the last column: "
        "profile 1's dictionary, which held the corpus's user names and key id, on the same "
        "messages; the held-out run uses the same user names as the training run, so profile 1 "
        "looks better on it than on anyone else's traffic):",
        "",
        head,
    ]
    for kind in ("request", "response"):
        m = medians[kind]
        lines.append(
            f"| {kind}s | "
            + " | ".join(f"{m[c]:,.0f}" for c in COLUMNS)
            + f" | {base[kind]:,.0f} |"
        )
    f, f1 = t["federation"], t1["federation"]
    lines += [
        "",
        f"Size targets (profile {args.profile}; profile 1 in brackets): the client message send "
        '(`PUT …/send/m.room.message/…`, body `{"msgtype":"m.text","body":"Hello world"}`, '
        f"sticky token) is a **{t['send_request']}-byte** CoAP message ({t1['send_request']}); its "
        f"200 response is **{t['send_response']} bytes** ({t1['send_response']}).",
    ]
    if f:
        lines[-1] += (
            f" A federation transaction with one real signed m.room.message PDU (from the "
            f"training corpus: profile 1 was trained on it) has a **{f['payload']}-byte body = "
            f"{f['payload'] / f['json']:.1%}** of its {f['json']}-byte JSON "
            f"({f1['payload']} B = {f1['payload'] / f1['json']:.1%}); the whole CoAP message is "
            f"{f['coap']} B = {f['coap'] / f['json']:.1%} on a cold session"
        )
        if "warm" in f:
            lines[-1] += (
                f" and **{f['warm']} B = {f['warm'] / f['json']:.1%}** "
                f"({f1.get('warm', 0)} B) once a previous transaction in the room was acknowledged"
            )
        lines[-1] += "."
    totals = renamed_totals(args.corpus, (1, args.profile))
    cap, ren = totals["as captured"], totals["renamed"]
    lines += [
        "",
        f"Total bytes `encode_body` sends over the {sum(1 for _ in CORPORA[args.corpus].glob('*.jsonl'))} "
        f"files' bodies: as captured, profile {args.profile} {cap[args.profile]:,} B against "
        f"profile 1 {cap[1]:,} B ({cap[args.profile] / cap[1] - 1:+.1%}: profile 1 knew these "
        "user names and key id); with every user, server, alias and key id renamed, as another "
        f"deployment's traffic would be, {ren[args.profile]:,} B against {ren[1]:,} B "
        f"({ren[args.profile] / ren[1] - 1:+.1%}). The message send above is larger under "
        f'profile {args.profile} because its text ("Hello world") is not in the dictionary: '
        "profile 2 holds no message text of the corpus.",
    ]
    lines += [
        "",
        f"_`{meta['command']}`, commit `{meta['commit']}`, {meta['time']}; rows in "
        "`bench/results/wire_sizes.csv`._",
    ]
    return "\n".join(lines)


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
