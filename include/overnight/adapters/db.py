"""Postgres adapter: connections to the `overnight_postgres` database."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from overnight.adapters.connections import postgres_dsn


def connect(dsn: str | None = None, *, autocommit: bool = False) -> psycopg.Connection:
    """Opens a connection to the application database (the `overnight_postgres` connection)."""
    return psycopg.connect(
        dsn or postgres_dsn(), autocommit=autocommit, connect_timeout=10, application_name="overnight"
    )


@contextlib.contextmanager
def transaction(dsn: str | None = None) -> Iterator[psycopg.Connection]:
    """Yields a connection inside one transaction, committed on success, rolled back on error."""
    with connect(dsn) as conn:
        yield conn
