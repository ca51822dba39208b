"""``private_key_store: database`` in a real Synapse (SQLite here; PostgreSQL, shared
by the instances of a worker deployment, in test_workers_topology.py).

First start: the key file named by ``private_key_path`` is imported into the table
and the listener uses it. A restart with a different file there keeps the table's
key (and warns, naming only public keys). A start with no file generates nothing
new: the table's key is read back. The private key is never logged.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from synapse_coap.noise import keys
from tests.harness.synapse_proc import SynapseProcess, free_port

pytestmark = pytest.mark.integration

logger = logging.getLogger(__name__)

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


class KeyRaceProbe:
    """A test-only Synapse module: ``n`` instances' worth of load_or_create at once,
    each with its own key, through Synapse's own database pool (its connections,
    its isolation level and its retries)."""

    def __init__(self, config: dict[str, Any], api: Any) -> None:
        from synapse.logging.context import make_deferred_yieldable
        from twisted.internet import defer

        from synapse_coap.synapse import compat
        from synapse_coap.synapse.store import DatabaseKeyStore

        hs = compat.homeserver(api)

        async def one(i: int) -> tuple[str, bool]:
            key, stored = await DatabaseKeyStore.for_homeserver(hs).load_or_create(
                bytes([i + 1]) * 32
            )
            return key.hex(), stored

        async def run() -> None:
            try:
                results = await make_deferred_yieldable(
                    defer.gatherResults(
                        [
                            compat.run_as_background_process("key_probe_one", hs.hostname, one, i)
                            for i in range(config["n"])
                        ],
                        consumeErrors=True,
                    )
                )
                logger.info("KEYPROBE %s", json.dumps({"results": results}))
            except Exception as e:
                logger.exception("KEYPROBE failed")
                logger.info("KEYPROBE %s", json.dumps({"error": repr(e)}))

        compat.run_as_background_process("key_probe", hs.hostname, run)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        return config


def test_instances_starting_together_agree_on_one_key_on_postgres(tmp_path: Path) -> None:
    """Concurrent first starts on a fresh PostgreSQL database (Synapse's own pool,
    REPEATABLE READ, several connections): one candidate is stored, all read it."""
    from synapse_coap_lab.services import PG_HOST, PG_PORT, PG_USER
    from tests.integration.test_module_store import fresh_pg_database

    with fresh_pg_database() as dbname:
        proc = SynapseProcess(
            tmp_path / "hs",
            "keyrace.test",
            modules=[
                {
                    "module": "tests.integration.test_key_in_database.KeyRaceProbe",
                    "config": {"n": 6},
                }
            ],
            extra_config={
                "database": {
                    "name": "psycopg2",
                    "args": {
                        "user": PG_USER,
                        "host": PG_HOST,
                        "port": PG_PORT,
                        "database": dbname,
                        "cp_min": 6,
                        "cp_max": 6,
                    },
                }
            },
        )
        proc.start(ready_log_pattern=r"KEYPROBE ", timeout=120)
        try:
            found = re.findall(r"KEYPROBE (\{.*\})", proc.log_text())
        finally:
            proc.stop()
    result = json.loads(found[-1])
    assert "error" not in result, result
    keys_seen = {key for key, _ in result["results"]}
    assert len(keys_seen) == 1, result
    assert sum(stored for _, stored in result["results"]) == 1, result
