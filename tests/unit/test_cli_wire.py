"""``synapse-coap wire``: a round trip through the real command is exact."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from synapse_coap.mapping import samples
from synapse_coap.mapping.coap import encode_coap
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile, profile_ids

# The installed console script (the real command), next to this interpreter.
_SCRIPT = Path(sys.executable).parent / "synapse-coap"
CMD = (
    [str(_SCRIPT), "wire"]
    if _SCRIPT.exists()
    else [
        sys.executable,
        "-c",
        "import sys; from synapse_coap.cli import main; sys.exit(main())",
        "wire",
    ]
)


def run(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CMD, *args], input=stdin, capture_output=True, timeout=60, check=False)


def test_request_round_trip_through_the_command(tmp_path: Path) -> None:
    target = samples.send_target(5).decode()
    body = tmp_path / "body.json"
    body.write_bytes(samples.SEND_BODY)
    enc = run(
        [
            "encode-request",
            "--method",
            "PUT",
            "--target",
            target,
            "--header",
            "Content-Type: application/json",
            "--header",
            "User-Agent: curl",
            "--body",
            str(body),
            "--server-name",
            samples.SERVER,
            "--token",
            "abcd",
        ]
    )
    assert enc.returncode == 0, enc.stderr
    codec = WireCodec(load_profile(max(profile_ids())), WireContext((samples.SERVER,)))
    expected = codec.encode_request(samples.send_request(5))
    assert enc.stdout == encode_coap(expected, token=bytes.fromhex("abcd"))
    dec = run(["decode", "--server-name", samples.SERVER], enc.stdout)
    assert dec.returncode == 0, dec.stderr
    out = json.loads(dec.stdout)
    assert out["method"] == "PUT" and out["target"] == target
    assert out["headers"] == [["content-type", "application/json"]]  # User-Agent dropped on purpose
    assert out["body_encoding"] == "json" and out["body"] == json.loads(samples.SEND_BODY)
    assert out["route"] == "client.v3.rooms._.send.3"


def test_response_round_trip_with_binary_body() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    enc = run(
        [
            "encode-response",
            "--status",
            "418",
            "--header",
            "Content-Type: image/png",
            "--body",
            "-",
        ],
        png,
    )
    assert enc.returncode == 0, enc.stderr
    dec = run(["decode", "--response"], enc.stdout)
    out = json.loads(dec.stdout)
    assert out["status"] == 418 and out["headers"] == [["content-type", "image/png"]]
    assert out["body_encoding"] == "base64" and base64.b64decode(out["body"]) == png


def test_garbage_is_refused_cleanly() -> None:
    dec = run(["decode"], b"\x00\x01garbage")
    assert dec.returncode == 1 and b"cannot decode" in dec.stderr and b"Traceback" not in dec.stderr


def test_help_texts() -> None:
    out = run(["--help"]).stdout.decode()
    assert "encode-request" in out and "decode" in out
    out = run(["encode-request", "--help"]).stdout.decode()
    assert "--target" in out and "--server-name" in out and "percent-encoding" in out
