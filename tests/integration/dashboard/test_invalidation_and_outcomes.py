"""Issue 27 on real Postgres and Redis, through the dashboard's store: an invalidated user's older document is
`invalidated` or `recalculating`, never current, and the cache warmer does not put it back; the session a
recalculation runs; `/audit/assets/{symbol}` finds every calculation whose universe held the asset with its outcome;
cache-warmer runs are `cache-warm` job runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
import redis

from overnight.adapters import cache
from overnight.dashboard.store import DashboardStore
from overnight.domain import freshness, sessions
from overnight.domain.markets import get_market
from overnight.night import invalidation
from overnight.ops import cache_warmer
from tests.support.pipeline_run import run_market

SESSION = date(2026, 10, 20)  # a Tuesday no other test scores
T = TypeVar("T")


def _store(dsn: str, fn: Callable[[DashboardStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = DashboardStore(dsn, os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"])
        try:
            return await fn(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def night(pg_dsn: str, seeded: dict[str, int]) -> dict[str, Any]:
    job = run_market(pg_dsn, "XNYS", SESSION, "test-invalidation", redis_url=os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"],
                     batch_size=500, latest=True, force=True).job
    with psycopg.connect(pg_dsn) as conn:
        users = [r[0] for r in conn.execute("SELECT user_id::text FROM recommendations WHERE correlation_id = %s"
                                            " ORDER BY user_id LIMIT 3", (job.correlation_id,))]
    return {"job": job, "users": users, "dsn": pg_dsn}


def test_an_invalidated_document_is_never_current(night: dict[str, Any], redis_client: redis.Redis) -> None:
    user, dsn = night["users"][0], night["dsn"]
    at = sessions.session_open_utc("XNYS", SESSION)  # a moment the session's documents are current
    assert _store(dsn, lambda s: s.dashboard(user, now=at)).stale is False
    with psycopg.connect(dsn) as conn:
        done = invalidation.invalidate_user(conn, redis_client, user, "a test")
        row = conn.execute("SELECT invalidated_by, dag_run_id FROM overnight_invalidations WHERE user_id = %s",
                           (user,)).fetchone()
    assert (done["userId"], done["keysDeleted"], done["cacheError"]) == (user, 2, None) and row == ("a test", None)
    assert redis_client.exists(cache.recs_key(user), cache.portfolio_key(user)) == 0
    view = _store(dsn, lambda s: s.dashboard(user, now=at))
    assert (view.from_cache, view.stale, view.stale_reason, view.correlation_id) == (
        False, True, freshness.INVALIDATED, night["job"].correlation_id)

    # a recalculation asked (its DAG run recorded): recalculating until its job run ends, then invalidated
    run_id = "recalculation__test"
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE overnight_invalidations SET dag_run_id = %s WHERE user_id = %s", (run_id, user))
        conn.commit()
    assert _store(dsn, lambda s: s.dashboard(user, now=at)).stale_reason == freshness.RECALCULATING
    later = datetime.now(UTC) + invalidation.RECALCULATION_WAIT + timedelta(minutes=1)
    assert _store(dsn, lambda s: s.dashboard(user, now=later)).stale_reason == freshness.INVALIDATED  # given up

    # the cache warmer does not bring the invalidated document back; the others it does
    with psycopg.connect(dsn) as conn:
        result = cache_warmer.warm_from_postgres(conn, redis_client, night["users"])
    assert (result["users_warmed"], result["missing"]) == (2, 1)
    assert redis_client.exists(cache.recs_key(user)) == 0
    assert redis_client.exists(*(cache.recs_key(u) for u in night["users"][1:])) == 2

    # a newer document lands (the recalculation, here the session re-run for that user): current again
    run_market(dsn, "XNYS", SESSION, "test-recalculated", user_ids=(user,), force=True,
               redis_url=os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"])
    again = _store(dsn, lambda s: s.dashboard(user, now=at))
    assert (again.from_cache, again.stale, again.stale_reason) == (True, False, None)
    assert again.correlation_id != night["job"].correlation_id


def test_the_recalculation_runs_the_current_documents_session_else_the_next(night: dict[str, Any]) -> None:
    user, dsn = night["users"][1], night["dsn"]
    lead = get_market("XNYS").lead
    deadline = freshness.document_deadline("XNYS", lead, SESSION, freshness.grace())
    with psycopg.connect(dsn) as conn:
        markets = conn.execute("SELECT markets FROM users WHERE id = %s", (user,)).fetchone()[0]
        assert invalidation.recalculation_session(conn, user, deadline - timedelta(minutes=1)) == ("XNYS", SESSION)
        after = deadline + timedelta(minutes=1)
        upcoming = min(sessions.next_run(c, timedelta(0), after, inclusive=False)[0] for c in markets)
        assert invalidation.recalculation_session(conn, user, after) == (
            sessions.serving_market(markets, upcoming), upcoming)
        with pytest.raises(invalidation.UnknownUser):
            invalidation.recalculation_session(conn, "00000000-0000-0000-0000-000000000001")


def test_audit_finds_calculations_that_held_the_asset_scored_or_not(night: dict[str, Any]) -> None:
    dsn = night["dsn"]
    with psycopg.connect(dsn) as conn:
        symbol, asset_id = conn.execute(
            "SELECT a.symbol, a.id FROM calculation_events e, jsonb_array_elements_text(e.payload -> 'universe') s"
            " JOIN assets a ON a.symbol = s WHERE e.correlation_id = %s AND e.event_type = 'SCORES_COMPUTED'"
            " GROUP BY a.symbol, a.id ORDER BY count(*) DESC, a.symbol LIMIT 1",
            (night["job"].correlation_id,)).fetchone()
        price = conn.execute("SELECT price, currency, as_of FROM prices WHERE asset_id = %s", (asset_id,)).fetchall()
        conn.execute("DELETE FROM prices WHERE asset_id = %s", (asset_id,))
        conn.commit()
    try:
        unpriced = run_market(dsn, "XNYS", SESSION, "test-unpriced", force=True, batch_size=500).job
    finally:
        with psycopg.connect(dsn) as conn:
            for p, c, a in price:
                conn.execute("INSERT INTO prices (asset_id, price, currency, as_of) VALUES (%s, %s, %s, %s)",
                             (asset_id, p, c, a))
            conn.commit()
    with psycopg.connect(dsn) as conn:
        # independently of the trail: the completed users of each job run whose universe holds the asset (holdings
        # or watchlist, in one of their markets)
        universe = ("SELECT j.user_id::text FROM overnight_job_users j JOIN users u ON u.id = j.user_id"
                    " WHERE j.job_run_id = %s AND j.status = 'completed' AND EXISTS (SELECT 1 FROM"
                    " (SELECT asset_id FROM holdings h WHERE h.user_id = u.id UNION SELECT asset_id FROM watchlist w"
                    " WHERE w.user_id = u.id) x JOIN assets a ON a.id = x.asset_id WHERE a.id = %s"
                    " AND a.market = ANY(u.markets))")
        holders = {j.correlation_id: {r[0] for r in conn.execute(universe, (j.id, asset_id))}
                   for j in (night["job"], unpriced)}
    assert holders[unpriced.correlation_id] == holders[night["job"].correlation_id] != set()

    async def every_page(store: DashboardStore) -> list[dict[str, Any]]:
        out, cursor = [], None
        while True:
            before = datetime.fromisoformat(cursor["before"]) if cursor else None
            page, cursor = await store.asset_events(symbol, limit=100, before=before,
                                                    before_id=cursor["beforeId"] if cursor else None)
            out += page
            if cursor is None:
                return out

    events = _store(dsn, every_page)
    found: dict[str, set[tuple[str, str, str | None]]] = {}
    for e in events:
        found.setdefault(e["correlationId"], set()).add((e["userId"], e["outcome"], e["reason"]))
    assert found[unpriced.correlation_id] == {(u, "unpriced", "no usable price")
                                              for u in holders[unpriced.correlation_id]}
    assert {u for u, *_ in found[night["job"].correlation_id]} == holders[night["job"].correlation_id]
    assert all(o in ("scored", "unscored") for _, o, _ in found[night["job"].correlation_id])
    assert all((e["score"] is not None) == (e["outcome"] == "scored") for e in events)


def test_cache_warmer_runs_are_cache_warm_job_runs(night: dict[str, Any], redis_client: redis.Redis) -> None:
    dsn = night["dsn"]
    first = cache_warmer.run(None, dag_run_id="manual__warm-test")
    retried = cache_warmer.run(None, dag_run_id="manual__warm-test")  # its task retried: the same job run
    with pytest.raises(ValueError, match="not a UUID"):
        cache_warmer.run(["nobody"], dag_run_id="manual__warm-bad")
    with psycopg.connect(dsn) as conn:
        documents = conn.execute(
            "SELECT count(*) FROM recommendations r LEFT JOIN overnight_invalidations i ON i.user_id = r.user_id"
            " WHERE i.invalidated_at IS NULL OR r.generated_at >= i.invalidated_at").fetchone()[0]
        rows = conn.execute(
            "SELECT id::text, job_type, market, status, users_processed, session_date, error_details"
            " FROM overnight_job_runs WHERE dag_run_id IN ('manual__warm-test', 'manual__warm-bad')"
            " ORDER BY dag_run_id DESC").fetchall()
        executions = conn.execute(
            "SELECT attempt, status, users_processed FROM overnight_job_run_executions WHERE job_run_id = %s"
            " ORDER BY attempt", (first["job_run_id"],)).fetchall()
    today = datetime.now(UTC).date()
    assert first["job_run_id"] == retried["job_run_id"] == rows[0][0]
    assert rows[0][1:6] == ("cache-warm", None, "completed", documents, today) and first["users_warmed"] == documents
    assert rows[1][1:6] == ("cache-warm", None, "failed", 0, today)
    assert rows[1][6]["run"]["stage"] == "warm_cache" and "not a UUID" in rows[1][6]["run"]["message"]
    assert executions == [(1, "completed", documents), (2, "completed", documents)]
    runs = _store(dsn, lambda s: s.job_runs(limit=500))
    assert [(r["jobType"], r["market"]) for r in runs if r["id"] == rows[0][0]] == [("cache-warm", None)]
    history = _store(dsn, lambda s: s.market_history(30))
    assert all(r["jobType"] == "scoring" for h in history.values() for r in h)
