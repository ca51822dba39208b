"""The Noise static key in the module's own table (``private_key_store: database``).

Synapse's database pool is stood in for by one that runs each interaction on its own
SQLite connection to one file (Synapse turns the ``?`` placeholders into ``%s`` for
PostgreSQL; the SQL is otherwise the same). The module's use of it on PostgreSQL,
shared by the instances of a worker deployment, is in
tests/integration/test_workers_topology.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from synapse_coap.errors import LocalProtocolError, SynapseCoapError
from synapse_coap.synapse.store import KEY_TABLE, DatabaseKeyStore

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


class SqlitePool:
    """``runInteraction`` in a thread on a fresh SQLite connection per call, as
    separate instances would (Synapse also runs interactions in its thread pool)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def runInteraction(self, desc: str, fn: Any, *args: Any) -> Any:
        def run() -> Any:
            conn = sqlite3.connect(self.path, timeout=30)
            try:
                result = fn(conn.cursor(), *args)
                conn.commit()
                return result
            finally:
                conn.close()

        return await asyncio.to_thread(run)


def test_first_instance_stores_its_key_the_others_read_it_back(tmp_path: Path) -> None:
    pool = SqlitePool(tmp_path / "homeserver.db")
    first = asyncio.run(DatabaseKeyStore(pool).load_or_create(KEY_A))
    second = asyncio.run(DatabaseKeyStore(pool).load_or_create(KEY_B))
    assert first == (KEY_A, True)
    assert second == (KEY_A, False)  # insert-if-absent, then read back: one key for all
    with sqlite3.connect(tmp_path / "homeserver.db") as conn:
        rows = conn.execute(f"SELECT key_name, private_key FROM {KEY_TABLE}").fetchall()
    assert [r[0] for r in rows] == ["noise_static"]
    assert len(rows[0][1]) == 43  # unpadded base64 of 32 bytes


def test_instances_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    pool = SqlitePool(tmp_path / "homeserver.db")
    keys = [bytes([i]) * 32 for i in range(1, 9)]

    async def all_at_once() -> list[tuple[bytes, bool]]:
        stores = [DatabaseKeyStore(pool) for _ in keys]

        async def one(store: DatabaseKeyStore, key: bytes) -> tuple[bytes, bool]:
            return await store.load_or_create(key)

        return await asyncio.gather(*(one(s, k) for s, k in zip(stores, keys, strict=True)))

    results = asyncio.run(all_at_once())
    assert len({key for key, _ in results}) == 1
    assert sum(stored for _, stored in results) == 1


def test_a_damaged_row_is_refused_with_a_way_out(tmp_path: Path) -> None:
    pool = SqlitePool(tmp_path / "homeserver.db")
    asyncio.run(DatabaseKeyStore(pool).load_or_create(KEY_A))
    with sqlite3.connect(tmp_path / "homeserver.db") as conn:
        conn.execute(f"UPDATE {KEY_TABLE} SET private_key = 'AAAA'")
    with pytest.raises(SynapseCoapError, match="delete the row"):
        asyncio.run(DatabaseKeyStore(pool).load_or_create(KEY_B))
    with pytest.raises(LocalProtocolError):
        asyncio.run(DatabaseKeyStore(pool).load_or_create(b"short"))
