"""The trust-on-first-use table, in Synapse's own database (SQLite or PostgreSQL).

The noise layer's ``TrustStore`` interface is synchronous (it is consulted
during a handshake, on the asyncio loop). So :class:`DatabaseTrustStore`
loads the whole table into memory at start (:meth:`load`, on the reactor),
answers ``get`` from memory, and writes ``put`` through to the database
asynchronously on the reactor thread.

The first key recorded for a peer wins (``ON CONFLICT DO NOTHING``): to
accept a legitimately changed key, an operator deletes the row::

    DELETE FROM synapse_coap_trust WHERE peer = 'other.example.org';

and restarts Synapse (or the worker that binds the listener).

With ``private_key_store: database`` the Noise static private key lives in a
second table, ``synapse_coap_keys`` (:class:`DatabaseKeyStore`), so that every
instance of a worker deployment uses the one key without sharing a file.

The SQL is portable: ``?`` placeholders are converted by Synapse's
transaction wrapper for PostgreSQL, and ``INSERT ... ON CONFLICT`` works on
SQLite >= 3.24 and PostgreSQL >= 9.5.

Creating the table is serialised: ``CREATE TABLE IF NOT EXISTS`` is not safe
against a concurrent creation on PostgreSQL (two creators can both pass the
existence check, and the loser fails on ``pg_type``'s unique index). That
happens when two components of one process, or two workers, load the store
at the same moment on a fresh database. On PostgreSQL the creation therefore
takes a transaction-scoped advisory lock first; SQLite's write lock already
serialises it.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any

from twisted.internet import defer

from synapse_coap.errors import LocalProtocolError, SynapseCoapError
from synapse_coap.synapse import compat

logger = logging.getLogger(__name__)

TABLE = "synapse_coap_trust"

CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    peer TEXT NOT NULL PRIMARY KEY,
    static_key TEXT NOT NULL,
    first_seen_ts BIGINT NOT NULL
)
"""

INSERT = f"INSERT INTO {TABLE} (peer, static_key, first_seen_ts) VALUES (?, ?, ?) ON CONFLICT (peer) DO NOTHING"

SELECT_ALL = f"SELECT peer, static_key FROM {TABLE}"

# pg_advisory_xact_lock key: the first 8 bytes of "synapse_coap_trust", as a signed int64
SCHEMA_LOCK_KEY = int.from_bytes(b"syncoapt", "big", signed=True)


def ensure_table(txn: Any, postgres: bool) -> None:
    """Create the trust table if it does not exist, safely against concurrent creators."""
    if postgres:
        txn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))
    txn.execute(CREATE_TABLE)


def is_postgres(db_pool: Any) -> bool:
    from synapse.storage.engines import PostgresEngine

    return isinstance(getattr(db_pool, "engine", None), PostgresEngine)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


class DatabaseTrustStore:
    """A ``TrustStore`` (``get``/``put``) backed by a table in Synapse's main database."""

    def __init__(self, db_pool: Any, reactor: Any, server_name: str) -> None:
        self._db_pool = db_pool
        self._reactor = reactor
        self._server_name = server_name
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._pending: set[defer.Deferred[None]] = set()
        self.loaded = False

    @classmethod
    def for_homeserver(cls, hs: Any) -> DatabaseTrustStore:
        return cls(compat.database_pool(hs), hs.get_reactor(), hs.hostname)

    async def load(self) -> None:
        """Create the table if needed and read it. Call on the reactor, in a logcontext."""

        postgres = is_postgres(self._db_pool)

        def txn_fn(txn: Any) -> list[tuple[str, str]]:
            ensure_table(txn, postgres)
            txn.execute(SELECT_ALL)
            return [(str(r[0]), str(r[1])) for r in txn.fetchall()]

        rows = await self._db_pool.runInteraction("synapse_coap_trust_load", txn_fn)
        keys: dict[str, bytes] = {}
        for peer, text in rows:
            try:
                keys[peer] = _unb64(text)
            except ValueError:
                logger.warning("synapse-coap: ignoring unreadable trust entry for %r", peer)
        with self._lock:
            self._keys = keys
        self.loaded = True
        logger.info("synapse-coap: %d trusted peer key(s) loaded from the database", len(keys))

    # -- the TrustStore interface (any thread) --------------------------------------

    def get(self, peer: str) -> bytes | None:
        with self._lock:
            return self._keys.get(peer)

    def put(self, peer: str, key: bytes) -> None:
        with self._lock:
            if peer in self._keys:
                return
            self._keys[peer] = key
        self._reactor.callFromThread(self._start_write, peer, key)

    # -- write-through (reactor thread) -----------------------------------------------

    def _start_write(self, peer: str, key: bytes) -> None:
        d: defer.Deferred[None] = compat.run_as_background_process(
            "synapse_coap_trust_put",
            self._server_name,
            self._write,
            peer,
            key,
        )
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    async def _write(self, peer: str, key: bytes) -> None:
        now_ms = int(time.time() * 1000)

        def txn_fn(txn: Any) -> None:
            txn.execute(INSERT, (peer, _b64(key), now_ms))

        await self._db_pool.runInteraction("synapse_coap_trust_put", txn_fn)
        logger.info("synapse-coap: remembered the Noise key of %r (trust on first use)", peer)

    def pending_writes(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Wait until every ``put`` made so far is in the database (reactor thread)."""
        from synapse.logging.context import make_deferred_yieldable

        # queued behind the puts' own callFromThread calls (FIFO), so they have started
        turn: defer.Deferred[None] = defer.Deferred()
        self._reactor.callFromThread(turn.callback, None)
        await make_deferred_yieldable(turn)
        pending = list(self._pending)
        if pending:
            await make_deferred_yieldable(defer.DeferredList(pending, consumeErrors=True))


# -- the Noise static private key, shared by every instance (private_key_store: database)

KEY_TABLE = "synapse_coap_keys"

CREATE_KEY_TABLE = f"""
CREATE TABLE IF NOT EXISTS {KEY_TABLE} (
    key_name TEXT NOT NULL PRIMARY KEY,
    private_key TEXT NOT NULL,
    created_ts BIGINT NOT NULL
)
"""

#: The row holding the listener's Noise static key (X25519, base64).
STATIC_KEY_NAME = "noise_static"

INSERT_KEY = (
    f"INSERT INTO {KEY_TABLE} (key_name, private_key, created_ts) VALUES (?, ?, ?) "
    "ON CONFLICT (key_name) DO NOTHING"
)

SELECT_KEY = f"SELECT private_key FROM {KEY_TABLE} WHERE key_name = ?"


class DatabaseKeyStore:
    """The Noise static private key in the ``synapse_coap_keys`` table of Synapse's
    database, so that every instance (listeners, federation senders) uses the same
    key without sharing a file.

    :meth:`load_or_create` is race-safe between instances starting together: each
    inserts its candidate only if no key is there (``ON CONFLICT DO NOTHING``) and
    then reads back the one key that won. The key is never logged.
    """

    def __init__(self, db_pool: Any) -> None:
        self._db_pool = db_pool

    @classmethod
    def for_homeserver(cls, hs: Any) -> DatabaseKeyStore:
        return cls(compat.database_pool(hs))

    async def load_or_create(self, candidate: bytes) -> tuple[bytes, bool]:
        """The stored key, after storing ``candidate`` if there was none; and whether
        ``candidate`` is the key now stored. Call on the reactor, in a logcontext."""
        if len(candidate) != 32:
            raise LocalProtocolError("a Noise static private key is 32 bytes")
        postgres = is_postgres(self._db_pool)
        now_ms = int(time.time() * 1000)

        def txn_fn(txn: Any) -> str:
            if postgres:
                txn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))
            txn.execute(CREATE_KEY_TABLE)
            txn.execute(INSERT_KEY, (STATIC_KEY_NAME, _b64(candidate), now_ms))
            txn.execute(SELECT_KEY, (STATIC_KEY_NAME,))
            row = txn.fetchone()
            if row is None:  # pragma: no cover - the insert or a concurrent one is there
                raise RuntimeError(f"{KEY_TABLE}: no {STATIC_KEY_NAME} row after insert")
            return str(row[0])

        text = await self._db_pool.runInteraction("synapse_coap_key_load", txn_fn)
        try:
            key = _unb64(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise SynapseCoapError(
                f"{KEY_TABLE}: the {STATIC_KEY_NAME} row is not a base64 32-byte key; "
                "delete the row to have a new key generated"
            )
        return key, key == candidate
