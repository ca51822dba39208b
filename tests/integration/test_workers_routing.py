"""Worker routing with a real Synapse: each CoAP request goes where its path is routed.

One Synapse process (the main process, with an HTTP client listener) loads the
module with a ``workers`` section naming three instances: ``main`` (binds the CoAP
listener; serves what no route claims, in-process), ``front`` (its HTTP address is
main's own HTTP listener: requests routed there cross loopback HTTP, as they would
to another worker) and ``gone`` (an HTTP address nothing listens on). Synapse's
access log tells which path each request took (``synapse.access.coap`` in-process,
``synapse.access.http.<port>`` over HTTP).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.synapse_proc import SynapseError, SynapseProcess, free_port
from tests.integration.test_module import SERVER_NAME, Client, Homeserver, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homeserver]:
    workdir = tmp_path_factory.mktemp("routed")
    port, http_port, dead_port = free_port("udp"), free_port(), free_port()
    # an instance that takes the connection and never answers (a hung worker)
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(16)
    stuck_port = stuck.getsockname()[1]
    key_path = workdir / "keys" / "coap_noise.key"
    key_path.parent.mkdir()
    proc = SynapseProcess(
        workdir,
        SERVER_NAME,
        http_port=http_port,
        http_resources=("client",),
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "private_key_path": str(key_path),
                    "workers": {
                        "instances": {
                            "main": {
                                "listen": [f"127.0.0.1:{port}"],
                                "http": f"http://127.0.0.1:{http_port}",
                            },
                            "front": {"http": f"http://127.0.0.1:{http_port}"},
                            "gone": {"http": f"http://127.0.0.1:{dead_port}"},
                            "stuck": {"http": f"http://127.0.0.1:{stuck_port}"},
                        },
                        "routes": {
                            "front": ["^/_matrix/client/versions$"],
                            "gone": ["^/_matrix/client/v3/voip/turnServer$"],
                            "stuck": ["^/_matrix/client/v3/thirdparty/protocols$"],
                        },
                        "forward_timeout": 4,
                    },
                },
            }
        ],
    )
    proc.start(ready_log_pattern=r"synapse-coap: CoAP listener ready")
    try:
        yield Homeserver(proc, port, 0, key_path)
    finally:
        proc.stop()
        stuck.close()


def _access_lines(hs: Homeserver, path: str) -> list[str]:
    return [line for line in hs.proc.log_text().splitlines() if f" {path} " in line]


def test_routed_path_is_forwarded_over_http_and_the_rest_stays_in_process(
    routed: Homeserver,
) -> None:
    async def scenario(c: Client) -> tuple[int, int]:
        versions = await c.request("GET", "/_matrix/client/versions")
        login = await c.request("GET", "/_matrix/client/v3/login")
        return versions.status, login.status

    assert run(routed, scenario) == (200, 200)
    versions = _access_lines(routed, "/_matrix/client/versions")
    assert any(re.search(r"synapse\.access\.http\.\d+", line) for line in versions), versions
    assert not any("synapse.access.coap" in line for line in versions), versions
    login = _access_lines(routed, "/_matrix/client/v3/login")
    assert any("synapse.access.coap" in line for line in login), login
    assert not any("synapse.access.http" in line for line in login), login


def test_each_listener_instance_keeps_its_own_replay_watermark(routed: Homeserver) -> None:
    # instances sharing a key file on one machine must not overwrite each other's
    assert Path(f"{routed.key_path}.main.replay").exists()
    assert not Path(f"{routed.key_path}.replay").exists()


def test_request_routed_to_an_instance_that_is_down_gets_502_matrix_json(
    routed: Homeserver,
) -> None:
    async def scenario(c: Client) -> tuple[int, dict[str, str]]:
        resp = await c.request("GET", "/_matrix/client/v3/voip/turnServer", timeout=60)
        return resp.status, json.loads(resp.body)

    status, body = run(routed, scenario)
    assert status == 502
    assert body["errcode"] == "M_UNKNOWN" and "gone" in body["error"], body
    assert "cannot forward to gone" in routed.proc.log_text()


def test_config_naming_an_unknown_instance_stops_synapse_naming_the_field(
    tmp_path: Path,
) -> None:
    proc = SynapseProcess(
        tmp_path,
        SERVER_NAME,
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "workers": {
                        "instances": {"main": {"listen": ["127.0.0.1:0"]}},
                        "routes": {"generic9": ["^/_matrix/client/"]},
                    }
                },
            }
        ],
    )
    with pytest.raises(SynapseError) as failed:
        try:
            proc.start(ready_log_pattern=r"synapse-coap: CoAP listener ready", timeout=60)
        finally:
            proc.stop()
    text = str(failed.value) + (tmp_path / "console.log").read_text(errors="replace")
    assert "exited" in str(failed.value)
    assert "workers.routes.generic9" in text and "unknown instance" in text, text[-2000:]


def test_request_routed_to_an_instance_that_never_answers_gets_504_matrix_json(
    routed: Homeserver,
) -> None:
    async def scenario(c: Client) -> tuple[int, dict[str, str]]:
        resp = await c.request("GET", "/_matrix/client/v3/thirdparty/protocols", timeout=60)
        return resp.status, json.loads(resp.body)

    status, body = run(routed, scenario)
    assert status == 504
    assert body["errcode"] == "M_UNKNOWN" and "stuck" in body["error"], body
