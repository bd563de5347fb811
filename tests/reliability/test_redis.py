"""Redis unreachable for the whole run, then Redis flushed after the run.

Results complete in Postgres; the job run's metrics say the cache was not warmed; the dashboard's data
layer serves from Postgres (fromCache False); `cache_warmer.run()` restores the keys with their TTL.
"""

from __future__ import annotations

import asyncio
import json
import os

import psycopg
import pytest

from overnight.adapters import cache
from overnight.dashboard.store import DashboardStore
from overnight.dev import cli
from overnight.ops import cache_warmer
from tests.support import reliability as R

MARKET = "XLON"


def _dashboard(pg_dsn: str, redis_url: str, user_id: str) -> dict:
    async def go() -> dict:
        store = DashboardStore(pg_dsn=pg_dsn, redis_url=redis_url)
        try:
            return (await store.dashboard(user_id)).to_json()
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_redis_down_for_the_run_then_flushed_then_rewarmed(pg_dsn, seeded, airflow_db, redis_client,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    redis_url = os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"]
    with psycopg.connect(pg_dsn) as conn:  # this session's documents must be the dashboard's: the latest rows of
        # newer sessions other tests left go first (an older session never replaces a newer document)
        conn.execute("DELETE FROM recommendations WHERE session_date > %s", (R.S_REDIS_DOWN,))
    with monkeypatch.context() as m:
        m.setenv("AIRFLOW_CONN_OVERNIGHT_REDIS", "redis://127.0.0.1:1/0")  # nothing listens there
        result = cli.run_market(MARKET, R.S_REDIS_DOWN, quiet=True, batch_size=100)
    assert result["dag_run_state"].endswith("success"), result
    with psycopg.connect(pg_dsn) as conn:
        out = R.check_invariants(conn, MARKET, R.S_REDIS_DOWN)
        expected = R.served(conn, MARKET, R.S_REDIS_DOWN)
        docs = dict(conn.execute(
            "SELECT user_id::text, document FROM recommendations WHERE correlation_id = %s",
            (out.correlation_id,)).fetchall())
    assert out.status == "completed" and out.completed == expected
    assert out.metrics["cache_status"] == "not warmed"
    assert out.metrics["cache_errors"], "the cache error should be recorded"
    some = sorted(expected)[:5]

    # Redis "flushed" after the run: this run's users' keys are gone (the test Redis DB holds other tests' keys).
    redis_client.delete(*[cache.recs_key(u) for u in expected], *[cache.portfolio_key(u) for u in expected])
    for uid in some:
        view = _dashboard(pg_dsn, redis_url, uid)
        assert view["fromCache"] is False
        assert view["recommendations"] == docs[uid]["recommendations"]
        assert view["totalInvestable"] == docs[uid]["totalInvestable"]
    # The dashboard with Redis unreachable as well: still Postgres, no error.
    assert _dashboard(pg_dsn, "redis://127.0.0.1:1/0", some[0])["fromCache"] is False

    warmed = cache_warmer.run(sorted(expected))
    assert warmed["users_warmed"] == len(expected) and warmed["missing"] == 0
    for uid in expected:
        assert json.loads(redis_client.get(cache.recs_key(uid))) == docs[uid]
        for key in (cache.recs_key(uid), cache.portfolio_key(uid)):
            assert 86_000 < redis_client.ttl(key) <= cache.TTL_SECONDS
    view = _dashboard(pg_dsn, redis_url, some[0])
    assert view["fromCache"] is True and view["recommendations"] == docs[some[0]]["recommendations"]
