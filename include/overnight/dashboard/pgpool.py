"""The dashboard's asyncio Postgres pool: bounded, with an acquire timeout (503, not a pile-up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

log = logging.getLogger(__name__)


PG_POOL_SIZE = 8  # the investors' pool: dashboards
OPS_POOL_SIZE = 3  # the operations routes' own: job runs, markets, the page, /audit (at most AUDIT_CONCURRENCY of them)
PG_ACQUIRE_TIMEOUT_S = 2.0  # waiting longer than this for a pooled connection: 503 at once, not a pile-up
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 10_000


class StoreUnavailable(RuntimeError):
    """Postgres cannot be reached or answered with an error; the message says which and what to check."""


# --------------------------------------------------------------------------- Postgres pool


class AsyncPgPool:
    """A small bounded pool of autocommit `psycopg.AsyncConnection`s, opened on first use.

    (psycopg_pool is not among the pinned requirements; this is the part of it the dashboard needs.)
    """

    def __init__(self, dsn: str, max_size: int = PG_POOL_SIZE, acquire_timeout_s: float = PG_ACQUIRE_TIMEOUT_S
                 ) -> None:
        self._dsn = dsn
        self._sem = asyncio.Semaphore(max_size)
        self.max_size, self.acquire_timeout_s = max_size, acquire_timeout_s
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._closed = False

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S,
            application_name="overnight-dashboard", options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
        )

    @contextlib.asynccontextmanager
    async def connection(self, *, fresh: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Lends a connection; returns it to the pool when it is still healthy and idle."""
        if self._closed:
            raise StoreUnavailable("the dashboard's Postgres pool is closed")
        try:
            async with asyncio.timeout(self.acquire_timeout_s):
                await self._sem.acquire()
        except TimeoutError:
            raise StoreUnavailable(f"all {self.max_size} connections of the dashboard's Postgres pool stayed busy "
                                   f"for {self.acquire_timeout_s:g} s") from None
        try:
            conn = None
            while self._idle and not fresh:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                conn = await self._open()
            ok = False
            try:
                yield conn
                ok = True
            finally:
                if ok and not self._closed and not conn.closed and (
                        conn.info.transaction_status == TransactionStatus.IDLE):
                    self._idle.append(conn)
                else:
                    await conn.close()
        finally:
            self._sem.release()

    async def fetch(self, sql: str, params: dict[str, Any] | tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Runs one parameterised query; retries once on a fresh connection if a pooled one went away. A query
        Postgres cancelled (statement timeout, an operator's cancel) is not run again."""
        for attempt in (1, 2):
            try:
                async with self.connection(fresh=attempt == 2) as conn:
                    cur = await conn.execute(sql, params)  # type: ignore[arg-type]
                    return await cur.fetchall()
            except psycopg.errors.QueryCanceled as exc:
                raise StoreUnavailable(f"Postgres (overnight_postgres) cancelled the query: {exc}".strip()) from exc
            except psycopg.errors.UndefinedTable as exc:  # a database the migrations never ran on
                raise StoreUnavailable(f"the overnight tables are missing from overnight_postgres's database ({exc});"
                                       " run `make migrate` (python -m overnight.adapters.migrate)".strip()) from exc
            except psycopg.OperationalError as exc:
                if attempt == 2:
                    raise StoreUnavailable(f"Postgres (overnight_postgres) is unavailable: {exc}".strip()) from exc
                log.info("dashboard: Postgres connection failed, retrying on a fresh one: %s", exc)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Closes the idle connections; connections on loan close when returned."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()
