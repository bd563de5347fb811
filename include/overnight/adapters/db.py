"""Postgres adapter: connections to the `overnight_postgres` database, through the provider's PostgresHook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from overnight.adapters.connections import postgres_hook


def connect(dsn: str | None = None, *, autocommit: bool = False) -> psycopg.Connection:
    """Opens a connection to the application database: the `overnight_postgres` connection through
    `PostgresHook` (psycopg 3; secrets backends and masking apply), or `dsn` where a tool names a database."""
    if dsn:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10, application_name="overnight")
    conn: psycopg.Connection = postgres_hook().get_conn()
    conn.autocommit = autocommit
    return conn


@contextlib.contextmanager
def transaction(dsn: str | None = None) -> Iterator[psycopg.Connection]:
    """Yields a connection inside one transaction, committed on success, rolled back on error."""
    with connect(dsn) as conn:
        yield conn
