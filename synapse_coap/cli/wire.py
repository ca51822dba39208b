"""``synapse-coap wire``: encode and decode single CoAP messages, for operators.

Examples::

    synapse-coap wire encode-request --method PUT \\
        --target '/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/m1.1' \\
        --header 'Content-Type: application/json' --body msg.json \\
        --server-name example.org > msg.coap
    synapse-coap wire decode --server-name example.org < msg.coap
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable
from typing import Any

from synapse_coap.cli.common import add_command
from synapse_coap.errors import SynapseCoapError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile, profile_ids

DESCRIPTION = """\
Encode an HTTP request or response into the exact CoAP message synapse-coap
sends (written to stdout as raw bytes), or decode such a message (read from
stdin) back to HTTP, printed as JSON. The message is the plain CoAP message
that travels inside a Noise record: header, token, options, payload.

The same --profile and --server-name values must be used on both sides: server
names are the per-session shared names that shorten identifiers (the wire
replaces them with one-byte references).
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a Matrix server name both peers know (repeatable, order matters); "
        "identifiers on these servers are shortened",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="N",
        help="wire profile id (default: the highest installed, the one peers negotiate; "
        "0 = without the compression dictionary)",
    )


def _http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an HTTP header (repeatable). Only Content-Type, Authorization, "
        "Cache-Control, ETag, Retry-After, Location and Content-Disposition are "
        "carried; others are dropped, as on the real wire",
    )
    p.add_argument(
        "--body", metavar="FILE|-", help="file with the body bytes, or - for stdin (default: empty)"
    )
    p.add_argument(
        "--token",
        default="",
        metavar="HEX",
        help="CoAP token bytes in hex (default: none; aiocoap uses 2 bytes)",
    )


def register(sub: Any) -> None:
    wire = add_command(
        sub,
        "wire",
        help="encode/decode single CoAP messages (wire debugging)",
        description=DESCRIPTION,
    )
    wsub = wire.add_subparsers(dest="wire_command", metavar="SUBCOMMAND")
    wsub.required = True
    _subcommand(
        wsub,
        "encode-request",
        help="HTTP request -> CoAP message bytes on stdout",
        description="Encode an HTTP request; writes the CoAP message bytes to stdout.",
        options=(_request_args, _http_args),
        func=_encode_request,
    )
    _subcommand(
        wsub,
        "encode-response",
        help="HTTP response -> CoAP message bytes on stdout",
        description="Encode an HTTP response; writes the CoAP message bytes to stdout.",
        options=(_response_args, _http_args),
        func=_encode_response,
    )
    _subcommand(
        wsub,
        "decode",
        help="CoAP message bytes on stdin -> JSON on stdout",
        description='Decode a CoAP message from stdin and print {"method", "target", '
        '"headers", "body"} (or {"status", "headers", "body"} with --response). '
        'The body is JSON when it is JSON ("body_encoding": "json"), else base64.',
        options=(_decode_args,),
        func=_decode,
    )


def _subcommand(
    wsub: Any,
    name: str,
    *,
    help: str,
    description: str,
    options: tuple[Callable[[argparse.ArgumentParser], None], ...],
    func: Callable[[argparse.Namespace], int],
) -> None:
    """A ``wire`` subcommand: its own options, then --profile and --server-name."""
    p = wsub.add_parser(name, help=help, description=description)
    for add in options:
        add(p)
    _common(p)
    p.set_defaults(func=func)


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="HTTP method, e.g. GET or PUT")
    p.add_argument(
        "--target",
        required=True,
        help="request target exactly as sent (path and query, percent-encoding kept)",
    )


def _response_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", type=int, required=True, help="HTTP status, 100-599")
    p.add_argument(
        "--want-json",
        action="store_true",
        help="encode as for a standard CoAP client that sent Accept: 50 (plain JSON)",
    )
    _answered_method(p)


def _answered_method(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        default="GET",
        help="the HTTP method of the request this response answers (default GET): "
        "200 is 2.05 for GET, 2.04 for POST/PUT/PATCH, 2.02 for DELETE",
    )


def _method_code(args: argparse.Namespace) -> int:
    return n.HTTP_TO_COAP_METHOD.get(str(args.method).upper(), n.POST)


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--response", action="store_true", help="the message is a response")
    p.add_argument(
        "--method",
        default="GET",
        help="with --response: the HTTP method of the request it answers (default GET)",
    )


def _codec(args: argparse.Namespace) -> WireCodec:
    return WireCodec(
        load_profile(max(profile_ids()) if args.profile is None else args.profile),
        WireContext(tuple(args.server_name)),
    )


def _headers(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for h in values:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"synapse-coap wire: bad --header {h!r} (expected 'Name: value')")
        out.append((name.strip(), value.strip()))
    return out


def _body(path: str | None) -> bytes:
    if path is None:
        return b""
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _encode_request(args: argparse.Namespace) -> int:
    try:
        req = HttpRequest(
            args.method, args.target.encode("utf-8"), _headers(args.header), _body(args.body)
        )
        msg = _codec(args).encode_request(req)
        _write(encode_coap(msg, token=bytes.fromhex(args.token)))
    except (SynapseCoapError, ValueError, OSError) as e:
        print(f"synapse-coap wire: {e}", file=sys.stderr)
        return 1
    return 0


def _encode_response(args: argparse.Namespace) -> int:
    try:
        resp = HttpResponse(args.status, _headers(args.header), _body(args.body))
        msg = _codec(args).encode_response(
            resp, want_json=args.want_json, method=_method_code(args)
        )
        _write(encode_coap(msg, mtype=2, token=bytes.fromhex(args.token)))
    except (SynapseCoapError, ValueError, OSError) as e:
        print(f"synapse-coap wire: {e}", file=sys.stderr)
        return 1
    return 0


def _body_json(body: bytes, content_type: str | None) -> dict[str, Any]:
    if content_type == "application/json" and body:
        try:
            return {"body": json.loads(body), "body_encoding": "json"}
        except ValueError:
            pass
    return {"body": base64.b64encode(body).decode("ascii"), "body_encoding": "base64"}


def _decode(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read()
    try:
        _mtype, _mid, _token, msg = decode_coap(data)
        codec = _codec(args)
        out: dict[str, Any]
        if args.response:
            resp = codec.decode_response(msg, method=_method_code(args))
            out = {"status": resp.status, "headers": [list(h) for h in resp.headers]}
            out.update(_body_json(resp.body, resp.header("content-type")))
        else:
            req = codec.decode_request(msg)
            out = {
                "method": req.method,
                "target": req.target.decode("utf-8", "backslashreplace"),
                "headers": [list(h) for h in req.headers],
            }
            out.update(_body_json(req.body, req.header("content-type")))
            out["route"] = codec.route_name(msg)
    except SynapseCoapError as e:
        print(f"synapse-coap wire: cannot decode: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0
