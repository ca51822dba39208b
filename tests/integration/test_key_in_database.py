"""``private_key_store: database`` in a real Synapse (SQLite here; PostgreSQL, shared
by the instances of a worker deployment, in test_workers_topology.py).

First start: the key file named by ``private_key_path`` is imported into the table
and the listener uses it. A restart with a different file there keeps the table's
key (and warns, naming only public keys). A start with no file generates nothing
new: the table's key is read back. The private key is never logged.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from synapse_coap.noise import keys
from tests.harness.synapse_proc import SynapseProcess, free_port

pytestmark = pytest.mark.integration

READY = r"synapse-coap: CoAP listener ready"


def _ready_public_key(text: str) -> str:
    found = re.findall(r"CoAP listener ready .*Noise public key (\S+) \(from ([^)]*)\)", text)
    assert found, text[-2000:]
    public, source = found[-1]
    assert source == "database table synapse_coap_keys", source
    return str(public)


def test_key_imported_once_then_read_back_from_the_database(tmp_path: Path) -> None:
    first, other = keys.generate_private_key(), keys.generate_private_key()
    key_file = tmp_path / "import.coap.key"
    keys.write_key_file(key_file, first)
    config = {
        "listen": [f"127.0.0.1:{free_port('udp')}"],
        "private_key_store": "database",
        "private_key_path": str(key_file),
    }
    proc = SynapseProcess(
        tmp_path / "hs",
        "keydb.test",
        modules=[{"module": "synapse_coap.CoapModule", "config": config}],
    )
    proc.start(ready_log_pattern=READY)
    try:
        text = proc.log_text()
        assert _ready_public_key(text) == keys.encode_public(keys.public_key(first))
        assert f"Noise static key imported from {key_file}" in text
        # a different key file now: the table's key wins, with a warning
        key_file.unlink()
        keys.write_key_file(key_file, other)
        proc.restart(ready_log_pattern=READY)
        text = proc.log_text()
        assert _ready_public_key(text) == keys.encode_public(keys.public_key(first))
        assert "is not the Noise key in database table synapse_coap_keys" in text
        # no file at all: the table's key, nothing generated
        key_file.unlink()
        proc.restart(ready_log_pattern=READY)
        text = proc.log_text()
        assert _ready_public_key(text) == keys.encode_public(keys.public_key(first))
        assert "Noise static key generated" not in text
    finally:
        proc.stop()
    text = proc.log_text()
    for private in (first, other):
        for form in (base64.b64encode(private).decode().rstrip("="), private.hex()):
            assert form not in text
    assert not list((tmp_path / "hs").rglob("*.coap.key"))
    assert (tmp_path / "hs" / "keydb.test.main.coap.replay").exists()
