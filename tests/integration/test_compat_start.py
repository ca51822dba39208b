"""A Synapse that lacks a private piece the module needs stops at start, naming it.

The real homeserver process is started with one internal monkeypatched away
(``SynapseHomeServer._configure_named_resource``, which Synapse itself only
uses later, when it starts its listeners): loading the module's config must
stop Synapse with a ConfigError that names the Synapse version and the piece.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness.synapse_proc import SYNAPSE_PYTHON, SynapseProcess, free_port, synapse_version

pytestmark = pytest.mark.integration

BROKEN_START = (
    "import sys\n"
    "import synapse.app.homeserver as homeserver\n"
    "del homeserver.SynapseHomeServer._configure_named_resource\n"
    "sys.argv = ['homeserver', '-c', sys.argv[1]]\n"
    "homeserver.main()\n"
)


def test_missing_internal_stops_synapse_with_a_config_error(tmp_path: Path) -> None:
    proc = SynapseProcess(
        tmp_path,
        "compat.test",
        http_port=None,
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {"listen": [f"127.0.0.1:{free_port('udp')}"]},
            }
        ],
    )
    proc.write_config()
    out = subprocess.run(
        [SYNAPSE_PYTHON, "-c", BROKEN_START, str(proc.config_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Error in configuration" in text, text
    assert f"synapse-coap cannot run on Synapse {synapse_version()}" in text, text
    assert "SynapseHomeServer._configure_named_resource" in text, text
