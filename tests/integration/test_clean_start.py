"""A clean start and shutdown: Synapse with the module logs no ERROR and no Traceback,
with and without an HTTP client listener (issue 15, Deliver 3).

With an HTTP listener serving ``client`` (as in sample_homeserver.yaml) the module
reuses that listener's live resources: a second ``ClientRestResource`` would build
a second copy of its caches, whose metrics are already registered (an ERROR).
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.messages import CoapMessage, CoapOption
from tests.harness.synapse_proc import SynapseProcess, free_port

pytestmark = pytest.mark.integration

READY = r"synapse-coap: CoAP listener ready"


def plain_get_versions(port: int) -> bytes:
    """GET /_matrix/client/versions over plain CoAP with Accept: 50; the JSON body."""
    msg = CoapMessage(
        1,
        (
            CoapOption(11, b"_matrix"),
            CoapOption(11, b"client"),
            CoapOption(11, b"versions"),
            CoapOption(17, b"\x32"),
            CoapOption(23, b"\x06"),  # Block2 early negotiation: 1024-byte blocks
        ),
        b"",
    )
    body = b""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        for num in range(64):
            block = CoapOption(
                23, bytes([(num << 4) | 6]) if num < 16 else ((num << 4) | 6).to_bytes(2, "big")
            )
            options = (*(o for o in msg.options if o.number != 23), block)
            sock.sendto(
                encode_coap(CoapMessage(1, options, b""), mid=num + 1, token=b"\x01"),
                ("127.0.0.1", port),
            )
            _t, _m, _tok, res = decode_coap(sock.recv(2048))
            assert res.code == 69, res
            body += res.payload
            b2 = res.first(23)
            if b2 is None or not int.from_bytes(b2, "big") & 0x08:
                return body
    raise AssertionError("too many blocks")


@pytest.mark.parametrize(
    "http_listener", [False, True], ids=["coap-only", "with-http-client-listener"]
)
def test_no_error_and_no_traceback_at_start_and_shutdown(
    tmp_path: Path, http_listener: bool
) -> None:
    plain_port = free_port("udp")
    proc = SynapseProcess(
        tmp_path,
        "clean.test",
        http_port=free_port() if http_listener else None,
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [],
                    "plain_listen": [f"127.0.0.1:{plain_port}"],
                    "private_key_path": str(tmp_path / "coap.key"),
                },
            }
        ],
    )
    proc.start(ready_log_pattern=READY)
    try:
        over_coap = json.loads(plain_get_versions(plain_port))
        if http_listener:
            with urllib.request.urlopen(
                proc.base_url + "/_matrix/client/versions", timeout=10
            ) as r:
                # (the module may add its own unstable features over CoAP)
                assert json.loads(r.read())["versions"] == over_coap["versions"]
        assert "v1.1" in over_coap["versions"]
    finally:
        proc.stop()
    log = proc.log_text()
    assert "synapse-coap: CoAP listener ready" in log
    assert re.search(r"Shutting down|stopping|asyncio thread joined", log), log[-2000:]
    bad = [line for line in log.splitlines() if " - ERROR - " in line or "Traceback" in line]
    assert not bad, "\n".join(bad[:20])
    console = (tmp_path / "console.log").read_text(errors="replace")
    assert "Traceback" not in console, console[-3000:]
