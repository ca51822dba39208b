"""The local PostgreSQL and Redis the tests and benches use (they run before a session
starts, on the machine's loopback): reachability checks and throw-away databases."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from typing import Any

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def pg_unavailable() -> str | None:
    """None when PostgreSQL can be used, else why not."""
    try:
        import psycopg2  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary, Synapse's postgres extra)"
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=2):
            pass
    except OSError as e:
        return f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} ({e})"
    return None


def pg_connect(dbname: str = "postgres") -> Any:
    """An autocommit psycopg2 connection to ``dbname``."""
    import psycopg2  # type: ignore[import-untyped]

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "synapse_coap_test") -> Iterator[str]:
    """A new, empty database (UTF8, C collation), dropped afterwards; its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = pg_connect()
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def redis_unavailable() -> str | None:
    """None when Redis answers PING, else why not."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return "no PONG"
    except OSError as e:
        return str(e)
    return None
