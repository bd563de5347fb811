"""The benchmark's I/O floor: the same rows and documents, streamed through files, and nothing left behind."""

from __future__ import annotations

from datetime import date

import psycopg
import redis

from overnight.dev import bench
from tests.conftest import RUN_ID, TEST_ENV
from tests.support import databases
from tests.support.pipeline_run import run_market


def _rows(c: psycopg.Connection, table: str) -> tuple:
    return c.execute(f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t").fetchone()


def test_io_floor_writes_the_same_rows_and_documents(tmp_path, monkeypatch):
    name = f"ovt_{RUN_ID}_io_floor"
    dsn = databases.clone(databases.app_template(databases.SEEDED_USERS, databases.SEED), name)
    redis_url = TEST_ENV["AIRFLOW_CONN_OVERNIGHT_REDIS"]
    rc = redis.Redis.from_url(redis_url)
    monkeypatch.setattr(bench, "FLOOR_PIPELINE", 7)  # several pipelines, the last one short
    monkeypatch.setattr(bench, "FLOOR_BLOCK", 4096)  # several blocks per table
    b = bench.Bench.__new__(bench.Bench)  # only what the floor uses: its database, Redis, home and figures
    b.dsn, b.redis_url, b.home, b.figures = dsn, redis_url, tmp_path / "home", {}
    try:
        run_market(dsn, "XNYS", date(2026, 12, 1))
        dumps = b.floor_dump()
        assert all(p.is_relative_to(b.home) and p.stat().st_size > 0 for p in dumps)
        b.floor_load(dumps)
        with psycopg.connect(dsn) as c:
            for source, scratch in bench.FLOOR_TABLES:
                assert _rows(c, scratch) == _rows(c, source) and _rows(c, source)[0] > 0, source
            docs = {u: (d, p) for u, d, p in c.execute(bench.FLOOR_DOCUMENTS)}
        assert docs
        for uid, (doc, port) in docs.items():
            assert rc.get(f"benchfloor:recs:{uid}").decode() == doc
            assert rc.get(f"benchfloor:portfolio:{uid}").decode() == port
            assert 0 < rc.ttl(f"benchfloor:recs:{uid}") <= 86400
        assert sum(1 for _ in rc.scan_iter("benchfloor:*")) == 2 * len(docs)
        b.floor_clean()
        assert not (b.home / "io-floor").exists() and not list(rc.scan_iter("benchfloor:*"))
        with psycopg.connect(dsn) as c:
            for _, scratch in bench.FLOOR_TABLES:
                assert c.execute("SELECT to_regclass(%s)", (scratch,)).fetchone()[0] is None
    finally:
        for key in rc.scan_iter("benchfloor:*"):
            rc.delete(key)
        databases.drop(name)
