"""The dashboard's Postgres pool under abuse, on the real Postgres: a busy pool is a quick StoreUnavailable (503),
a query Postgres cancelled is not run again, a database never migrated says to migrate."""

from __future__ import annotations

import asyncio
import time

import pytest

from overnight.dashboard import pgpool
from overnight.dashboard.pgpool import AsyncPgPool, StoreUnavailable


def test_a_busy_pool_answers_unavailable_after_its_acquire_timeout(pg_dsn: str) -> None:
    async def go() -> tuple[str, float]:
        pool = AsyncPgPool(pg_dsn, max_size=1, acquire_timeout_s=0.3)
        held = asyncio.Event()

        async def hold() -> None:
            async with pool.connection():
                held.set()
                await asyncio.sleep(1.5)

        holder = asyncio.create_task(hold())
        await held.wait()
        t0 = time.monotonic()
        try:
            await pool.fetch("SELECT 1", ())
        except StoreUnavailable as exc:
            message, took = str(exc), time.monotonic() - t0
        else:
            message, took = "no error", 0.0
        await holder
        assert await pool.fetch("SELECT 1", ()) == [(1,)]  # the slot came back
        await pool.close()
        return message, took

    message, took = asyncio.run(go())
    assert message == "all 1 connections of the dashboard's Postgres pool stayed busy for 0.3 s"
    assert 0.25 <= took < 0.8


def test_a_cancelled_query_is_not_retried(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgpool, "PG_STATEMENT_TIMEOUT_MS", 200)

    async def go() -> tuple[str, int, float]:
        pool = AsyncPgPool(pg_dsn)
        opened = 0
        open_ = pool._open

        async def counting_open() -> object:
            nonlocal opened
            opened += 1
            return await open_()

        pool._open = counting_open  # type: ignore[method-assign]
        t0 = time.monotonic()
        try:
            await pool.fetch("SELECT pg_sleep(2)", ())
        except StoreUnavailable as exc:
            message = str(exc)
        else:
            message = "no error"
        took = time.monotonic() - t0
        await pool.close()
        return message, opened, took

    message, opened, took = asyncio.run(go())
    assert message.startswith("Postgres (overnight_postgres) cancelled the query: ") and "statement timeout" in message
    assert opened == 1, "the cancelled query was run again on a fresh connection"
    assert took < 1.0


def test_a_database_never_migrated_is_unavailable_saying_to_migrate(pg_dsn: str) -> None:
    """`make airflow` on a database `make migrate` never touched: a 503 that says what to run, not a 500."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"{conninfo_to_dict(pg_dsn)['dbname']}_empty"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async def go() -> str:
            pool = AsyncPgPool(make_conninfo(pg_dsn, dbname=name))
            try:
                await pool.fetch("SELECT status FROM overnight_job_runs LIMIT 1", ())
            except StoreUnavailable as exc:
                return str(exc)
            finally:
                await pool.close()
            return "no error"

        message = asyncio.run(go())
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert message.startswith("the overnight tables are missing from overnight_postgres's database")
    assert 'relation "overnight_job_runs" does not exist' in message and "run `make migrate`" in message
