"""The TOFU trust table in Synapse's own database, on SQLite and on PostgreSQL.

A real Synapse loads the CoapModule (which creates and loads the table) and a
small probe module (below) that drives the module's DatabaseTrustStore through
Synapse's own database pool: put, flush, reload in a fresh store, and the same
again after a restart. PostgreSQL runs against 127.0.0.1:5432 (trust auth, user
postgres) in a database the test creates and drops; it is skipped, saying why,
when that server or psycopg2 is not available.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from synapse_coap_lab import services
from synapse_coap_lab.services import PG_HOST, PG_PORT, PG_USER, pg_connect, pg_unavailable
from tests.harness.synapse_proc import SynapseProcess, free_port

pytestmark = pytest.mark.integration

logger = logging.getLogger(__name__)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
KEY_C = bytes(range(64, 96))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class TrustProbe:
    """A test-only Synapse module: exercises DatabaseTrustStore inside Synapse."""

    def __init__(self, config: dict[str, Any], api: Any) -> None:
        from synapse_coap.synapse import compat
        from synapse_coap.synapse.store import DatabaseTrustStore

        hs = compat.homeserver(api)

        async def run() -> None:
            try:
                store = DatabaseTrustStore.for_homeserver(hs)
                await store.load()
                before = {p: b64(store.get(p) or b"") for p in config["peers"]}
                for peer, key in config["put"].items():
                    store.put(peer, base64.b64decode(key))
                await store.flush()
                fresh = DatabaseTrustStore.for_homeserver(hs)
                await fresh.load()
                after = {p: b64(fresh.get(p) or b"") for p in config["peers"]}
                logger.info("TRUSTPROBE %s", json.dumps({"before": before, "after": after}))
            except Exception as e:
                logger.exception("TRUSTPROBE failed")
                logger.info("TRUSTPROBE %s", json.dumps({"error": repr(e)}))

        compat.run_as_background_process("trust_probe", hs.hostname, run)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        return config


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test (skipped, saying why, without a server)."""
    why = pg_unavailable()
    if why:
        pytest.skip(f"PostgreSQL test skipped: {why}")
    with services.fresh_pg_database() as name:
        yield name


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    if request.param == "sqlite":
        yield "sqlite", {}
        return
    with fresh_pg_database() as name:
        yield (
            "postgres",
            {
                "database": {
                    "name": "psycopg2",
                    "args": {
                        "user": PG_USER,
                        "host": PG_HOST,
                        "port": PG_PORT,
                        "database": name,
                        "cp_min": 1,
                        "cp_max": 3,
                    },
                }
            },
        )


def probe_result(proc: SynapseProcess, offset: int) -> dict[str, Any]:
    found = re.findall(r"TRUSTPROBE (\{.*\})", proc.log_text()[offset:])
    assert found, "the probe module did not report"
    result: dict[str, Any] = json.loads(found[-1])
    assert "error" not in result, result
    return result


def test_tofu_table_persists(database: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    kind, extra = database

    def make(put: dict[str, str]) -> SynapseProcess:
        return SynapseProcess(
            tmp_path / "hs",
            "store.test",
            modules=[
                {
                    "module": "synapse_coap.CoapModule",
                    "config": {
                        "listen": [f"127.0.0.1:{free_port('udp')}"],
                        "private_key_path": str(tmp_path / "coap.key"),
                    },
                },
                {
                    "module": "tests.integration.test_module_store.TrustProbe",
                    "config": {"peers": ["a.example", "b.example"], "put": put},
                },
            ],
            extra_config=extra,
        )

    # First run: nothing known; remember a.example's key.
    proc = make({"a.example": b64(KEY_A)})
    proc.start(ready_log_pattern=r"TRUSTPROBE ", timeout=120)
    try:
        first = probe_result(proc, 0)
    finally:
        proc.stop()
    assert first["before"] == {"a.example": "", "b.example": ""}
    assert first["after"] == {"a.example": b64(KEY_A), "b.example": ""}

    # Second run (restart): the key survived; a different key for a.example does not
    # replace the first one (first key wins), b.example is new.
    offset = len(proc.log_text())
    proc = make({"a.example": b64(KEY_C), "b.example": b64(KEY_B)})
    proc.start(ready_log_pattern=r"TRUSTPROBE ", timeout=120)
    try:
        second = probe_result(proc, offset)
        assert "trusted peer key(s) loaded from the database" in proc.log_text()[offset:]
    finally:
        proc.stop()
    assert second["before"] == {"a.example": b64(KEY_A), "b.example": ""}
    assert second["after"] == {"a.example": b64(KEY_A), "b.example": b64(KEY_B)}

    if kind == "postgres":
        dbname = extra["database"]["args"]["database"]
        conn = pg_connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT peer, static_key FROM synapse_coap_trust ORDER BY peer")
                rows = cur.fetchall()
        finally:
            conn.close()
        assert [r[0] for r in rows] == ["a.example", "b.example"]
        assert base64.b64decode(rows[0][1] + "==") == KEY_A


class _Txn:
    """The part of Synapse's LoggingTransaction that ensure_table uses, over psycopg2."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        self._cursor.execute(sql.replace("?", "%s"), args)


def _create_concurrently(dbname: str, creators: int, lock: bool) -> list[BaseException]:
    """Run ensure_table in `creators` transactions released at the same instant."""
    import threading

    import psycopg2

    from synapse_coap.synapse.store import ensure_table

    barrier = threading.Barrier(creators)
    errors: list[BaseException] = []

    def creator() -> None:
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                barrier.wait()
                ensure_table(_Txn(cur), postgres=lock)
            conn.commit()
        except BaseException as e:  # collected for the assertion
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=creator) for _ in range(creators)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_table_creation_on_postgres() -> None:
    """Two components (or workers) loading the store at once on a fresh PostgreSQL
    database must not fail: CREATE TABLE IF NOT EXISTS alone races on pg_type."""
    with fresh_pg_database() as name:
        for _ in range(10):
            errors = _create_concurrently(name, creators=8, lock=True)
            assert errors == []
            conn = pg_connect(name)
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM synapse_coap_trust")
                assert cur.fetchone() == (0,)
                cur.execute("DROP TABLE synapse_coap_trust")
            conn.close()
