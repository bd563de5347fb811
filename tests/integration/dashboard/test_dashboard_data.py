"""The dashboard's data access (overnight.dashboard.store) against real Postgres and Redis, on real pipeline output."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
import redis

from overnight.adapters import cache
from overnight.dashboard import docview, pgpool
from overnight.dashboard import store as dashboard
from tests.support import reliability as R
from tests.support.pipeline_run import run_market
from tests.support.ports import free_port

SESSION = date(2026, 11, 16)  # its next XNYS session (11-17) no other test runs: the miss below is "run_missing"
T = TypeVar("T")
HOSTILE_SYMBOLS = ["'", '"', "'; DROP TABLE users;--", "../../etc/passwd", "ÄÖÜ-€-日本", "%", "_", "\\", "{a,b}",
                   "' OR '1'='1"]


@pytest.fixture(scope="module")
def scored(pg_dsn: str, seeded: dict[str, int]) -> dict[str, Any]:
    """XNYS and BVMF scored for SESSION; a user with recommendations and a known user without any."""
    redis_url = os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"]
    with psycopg.connect(pg_dsn) as conn:  # the rates judged when the seed wrote them: fresh, whatever the clock
        rates_now = conn.execute("SELECT max(as_of) FROM exchange_rates WHERE source = 'seed'").fetchone()[0]
        served = {m: len(R.served(conn, m, SESSION)) for m in ("XNYS", "BVMF")}
    jobs = {m: run_market(pg_dsn, m, SESSION, "test-dashboard", redis_url=redis_url, batch_size=200, latest=True,
                          rates_now=rates_now).job
            for m in ("XNYS", "BVMF")}
    with psycopg.connect(pg_dsn) as conn:
        user_id, doc = conn.execute(
            "SELECT user_id, document FROM recommendations WHERE correlation_id = %s"
            " AND jsonb_array_length(document->'recommendations') > 1 ORDER BY user_id LIMIT 1",
            (jobs["XNYS"].correlation_id,)).fetchone()
        idle = uuid.uuid4()
        conn.execute(
            "INSERT INTO users (id, email, base_currency, default_contribution, markets, criteria_key, active)"
            " VALUES (%s, %s, 'EUR', 100, ARRAY['XLON'], 'tpl-01', false)", (idle, f"{idle}@example.test"))
        conn.commit()
    yield {"jobs": jobs, "user_id": str(user_id), "doc": doc, "idle_user": str(idle), "redis_url": redis_url,
           "pg_dsn": pg_dsn, "served": served}
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("DELETE FROM users WHERE id = %s", (idle,))


def with_store(scored: dict[str, Any], fn: Callable[[dashboard.DashboardStore], Awaitable[T]],
               redis_url: str | None = None) -> T:
    """Runs `fn(store)` on a fresh event loop with a fresh store, closed afterwards."""

    async def main() -> T:
        store = dashboard.DashboardStore(scored["pg_dsn"], scored["redis_url"] if redis_url is None else redis_url)
        try:
            return await fn(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    stop.set()
    thread.join(2)
    for s in held:
        s.close()
    srv.close()


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        pytest.param("0b7c6d4e-1f2a-4b3c-8d9e-0a1b2c3d4e5f", True, id="canonical"),
        pytest.param("0B7C6D4E1F2A4B3C8D9E0A1B2C3D4E5F", True, id="hex-upper"),
        pytest.param("not-a-uuid", False, id="words"),
        pytest.param("'; DROP TABLE users;--", False, id="sql"),
        pytest.param("", False, id="empty"),
    ],
)
def test_parse_user_id(raw: str, ok: bool) -> None:
    if ok:
        assert docview.parse_user_id(raw) == str(uuid.UUID(raw))
    else:
        with pytest.raises(docview.InvalidUserId, match="not a UUID"):
            docview.parse_user_id(raw)


NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("generated", "rates_stale", "reason"),
    [
        pytest.param(NOW - timedelta(hours=1), False, None, id="fresh"),
        pytest.param(NOW - timedelta(hours=25), False, "expired", id="older-than-24h"),
        pytest.param(NOW - timedelta(hours=1), True, "rates_stale", id="stale-rates"),
        pytest.param(None, False, "unknown_age", id="unknown-age"),
    ],
)
def test_staleness_without_market_and_session_uses_the_24h_rule(generated: datetime | None, rates_stale: bool,
                                                                 reason: str | None) -> None:
    # a document written before the calendar rule (no market/sessionDate): fresh for 24 h (docs/freshness.md)
    assert docview.staleness(generated, rates_stale, now=NOW) == reason


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        # XNYS's Friday 2026-11-20 document, built at its run (12:30 UTC). By hand: the NYSE next opens Monday
        # 2026-11-23 09:30 EST = 14:30 UTC; that run is due at 12:30 UTC, + 2 h grace = 14:30 UTC. From 12:30
        # the run is due (fresh unless it failed: the store looks it up); after 14:30 the document is overdue.
        pytest.param(datetime(2026, 11, 22, 12, 40, tzinfo=UTC), None, id="sunday-48h-old"),
        pytest.param(datetime(2026, 11, 23, 12, 29, tzinfo=UTC), None, id="monday-before-the-run"),
        pytest.param(datetime(2026, 11, 23, 12, 30, tzinfo=UTC), "due", id="monday-the-run-is-due"),
        pytest.param(datetime(2026, 11, 23, 14, 30, tzinfo=UTC), "due", id="monday-at-the-deadline"),
        pytest.param(datetime(2026, 11, 23, 14, 31, tzinfo=UTC), "overdue", id="monday-after-the-deadline"),
    ],
)
def test_staleness_with_market_and_session_follows_the_calendar_not_the_age(now: datetime, reason: str) -> None:
    generated = datetime(2026, 11, 20, 12, 40, tzinfo=UTC)
    assert docview.staleness(generated, False, "XNYS", "2026-11-20", now) == reason


# --------------------------------------------------------------------------- recommendations


def test_cache_hit_and_miss_serve_the_same_recommendations(scored: dict[str, Any]) -> None:
    uid = scored["user_id"]
    client = redis.Redis.from_url(scored["redis_url"])
    client.set(cache.recs_key(uid), json.dumps(scored["doc"]), ex=cache.TTL_SECONDS)
    hit = with_store(scored, lambda s: s.dashboard(uid))
    client.delete(cache.recs_key(uid))
    miss = with_store(scored, lambda s: s.dashboard(uid))
    client.close()
    assert hit.from_cache is True and miss.from_cache is False
    assert hit.recommendations == miss.recommendations == scored["doc"]["recommendations"]
    assert hit.to_json() | {"fromCache": None} == miss.to_json() | {"fromCache": None}
    assert miss.total_investable == scored["doc"]["totalInvestable"]
    assert miss.base_currency == scored["doc"]["portfolioSummary"]["baseCurrency"]
    assert miss.data_freshness == {**scored["doc"]["dataFreshness"],
                                   "generatedAt": datetime.fromisoformat(scored["doc"]["generatedAt"]).isoformat()}
    # SESSION's XNYS document is overdue once XNYS's next session's run + grace has passed, and no run
    # for that session exists in this database (docs/freshness.md)
    assert miss.stale is True and miss.stale_reason == "run_missing"


# SESSION (Monday 2026-11-16)'s XNYS document, built at its run. By hand from the NYSE calendar: the next
# session is Tuesday 2026-11-17, open 09:30 EST = 14:30 UTC; its run is due at 12:30 UTC (lead 2 h) and the
# document is fresh until 14:30 UTC (grace 2 h).
BUILT = datetime(2026, 11, 16, 12, 40, tzinfo=UTC)
NEXT_RUN_DUE = datetime(2026, 11, 17, 12, 30, tzinfo=UTC)
DEADLINE = datetime(2026, 11, 17, 14, 30, tzinfo=UTC)


@pytest.fixture
def dated_doc(scored: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The user's cached document as built at SESSION's run (generatedAt BUILT); put back afterwards."""
    uid = scored["user_id"]
    doc = {**scored["doc"], "generatedAt": BUILT.isoformat()}
    assert (doc["market"], doc["sessionDate"]) == ("XNYS", SESSION.isoformat())
    client = redis.Redis.from_url(scored["redis_url"])
    client.set(cache.recs_key(uid), json.dumps(doc), ex=cache.TTL_SECONDS)
    yield doc
    client.set(cache.recs_key(uid), json.dumps(scored["doc"]), ex=cache.TTL_SECONDS)
    client.close()


@pytest.mark.parametrize(
    ("now", "stale", "reason"),
    [
        pytest.param(BUILT + timedelta(hours=25), False, None, id="25h-old-before-the-deadline"),
        pytest.param(DEADLINE, False, None, id="at-the-deadline"),
        pytest.param(DEADLINE + timedelta(minutes=1), True, "run_missing", id="after-the-deadline"),
    ],
)
def test_stale_once_the_next_run_plus_grace_has_passed_not_after_24h(
        scored: dict[str, Any], dated_doc: dict[str, Any], now: datetime, stale: bool, reason: str | None) -> None:
    view = with_store(scored, lambda s: s.dashboard(scored["user_id"], now=now))
    assert view.from_cache is True
    assert (view.stale, view.stale_reason) == (stale, reason)


def test_a_failed_next_run_makes_the_document_stale_before_the_deadline(
        scored: dict[str, Any], dated_doc: dict[str, Any]) -> None:
    # docs/freshness.md: from the next run's scheduled time, a failed run of it makes the document stale at once.
    from overnight.dashboard import json_body

    uid = scored["user_id"]
    row = uuid.uuid4()

    def read(now: datetime, *, ask_cache: bool = True) -> docview.DashboardView:
        return with_store(scored, lambda s: s.dashboard(uid, now=now, ask_cache=ask_cache))

    before_due, failed_at = NEXT_RUN_DUE - timedelta(minutes=1), NEXT_RUN_DUE + timedelta(minutes=5)
    assert (read(failed_at).stale, read(failed_at).stale_reason) == (False, None)  # due, not started: fresh
    with psycopg.connect(scored["pg_dsn"]) as conn:
        conn.execute("INSERT INTO overnight_job_runs (id, job_type, status, started_at, completed_at, correlation_id,"
                     " market, session_date, users_processed, users_failed) VALUES (%s, 'scoring', 'failed', %s,"
                     " %s, %s, 'XNYS', '2026-11-17', 0, 0)", (row, NEXT_RUN_DUE, failed_at, uuid.uuid4()))
        conn.commit()
    try:
        for now, expected in ((before_due, (False, None)), (failed_at, (True, "run_failed")),
                              (DEADLINE, (True, "run_failed")), (DEADLINE + timedelta(minutes=1), (True, "run_failed"))):
            for ask_cache in (True, False):  # from Redis, and the Postgres fallback alike
                view = read(now, ask_cache=ask_cache)
                assert (now, view.from_cache, view.stale, view.stale_reason) == (now, ask_cache, *expected)

        # Once a process has read the run's status, its Redis hits answer from the fast path without a query.
        async def fast(store: dashboard.DashboardStore) -> tuple[bytes | None, bytes | None]:
            raw = await store.cached_raw(uid)
            assert raw is not None
            unknown = json_body.cached_dashboard_body(uid, raw, failed_at, next_run=store.known_next_run)
            await store.dashboard(uid, now=failed_at)
            return unknown, json_body.cached_dashboard_body(uid, raw, failed_at, next_run=store.known_next_run)

        unknown, known = with_store(scored, fast)
        assert unknown is None  # not read yet: the general path
        data = json.loads(known or b"{}")["data"]
        assert (data["stale"], data["staleReason"]) == (True, "run_failed")

        # Cleared and retried: the run is going again, the document is fresh until the deadline.
        with psycopg.connect(scored["pg_dsn"]) as conn:
            conn.execute("UPDATE overnight_job_runs SET status = 'started', completed_at = NULL WHERE id = %s", (row,))
            conn.commit()
        view = read(failed_at + timedelta(minutes=10))
        assert (view.stale, view.stale_reason) == (False, None)
        view = read(DEADLINE + timedelta(minutes=1))
        assert (view.stale, view.stale_reason) == (True, "run_unfinished")
    finally:
        with psycopg.connect(scored["pg_dsn"]) as conn:
            conn.execute("DELETE FROM overnight_job_runs WHERE id = %s", (row,))
            conn.commit()


@pytest.mark.parametrize("kind", [pytest.param("closed-port", id="redis-down"),
                                  pytest.param("silent", id="redis-hung")])
def test_redis_unavailable_falls_back_to_postgres_quickly(scored: dict[str, Any], silent_redis: str,
                                                          kind: str) -> None:
    url = silent_redis if kind == "silent" else f"redis://127.0.0.1:{free_port()}/0"
    uid = scored["user_id"]

    async def calls(store: dashboard.DashboardStore) -> tuple[list[docview.DashboardView], list[float]]:
        views, times = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            views.append(await store.dashboard(uid))
            times.append(time.perf_counter() - t0)
        return views, times

    views, times = with_store(scored, calls, redis_url=url)
    assert all(v.from_cache is False for v in views)
    assert all(v.recommendations == scored["doc"]["recommendations"] for v in views)
    assert times[0] < 1.0, f"first call took {times[0]:.3f} s: the Redis timeout is not ~200 ms"
    # refused: skipped at once; silent: each call waits 0.2 s until Redis has been silent for 1 s, then skipped
    slow = [t for t in times if t > 0.1]
    assert len(slow) <= (1 if kind == "closed-port" else 6), f"calls {times}: Redis is not skipped after it failed"
    assert max(times[-3:]) < 0.1, f"last calls {times[-3:]}: Redis is not skipped after it failed"


def test_a_late_redis_reply_costs_one_request_not_five_seconds_of_postgres(
        scored: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A stall (here Redis paused 0.5 s; on a busy machine the whole machine, 240 ms) makes replies late, not
    lost: the calls that time out are answered from Postgres, and the next ones from Redis again."""
    uid = scored["user_id"]
    pauser = redis.Redis.from_url(scored["redis_url"])
    pauser.set(cache.recs_key(uid), json.dumps(scored["doc"]), ex=cache.TTL_SECONDS)

    async def calls(store: dashboard.DashboardStore) -> list[docview.DashboardView]:
        first = await store.dashboard(uid)  # connected, from Redis
        pauser.execute_command("CLIENT", "PAUSE", "500", "ALL")
        late = await store.dashboard(uid)  # times out after 0.2 s: Postgres
        await asyncio.sleep(0.5)  # the pause ends; the late reply arrives and is dropped
        return [first, late, await store.dashboard(uid), await store.dashboard(uid)]

    try:
        views = with_store(scored, calls)
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
    assert [v.from_cache for v in views] == [True, False, True, True]
    assert all(v.recommendations == scored["doc"]["recommendations"] for v in views)
    assert "Redis reply took over 200 ms" in caplog.text
    assert "Redis unavailable" not in caplog.text


def test_corrupt_cache_value_falls_back_to_postgres(scored: dict[str, Any]) -> None:
    uid = scored["user_id"]
    client = redis.Redis.from_url(scored["redis_url"])
    client.set(cache.recs_key(uid), b"{not json", ex=60)
    try:
        view = with_store(scored, lambda s: s.dashboard(uid))
    finally:
        client.delete(cache.recs_key(uid))
        client.close()
    assert view.from_cache is False and view.recommendations == scored["doc"]["recommendations"]


def test_unknown_known_and_malformed_users(scored: dict[str, Any]) -> None:
    with pytest.raises(docview.UnknownUser):
        with_store(scored, lambda s: s.dashboard(str(uuid.uuid4())))
    with pytest.raises(docview.InvalidUserId):
        with_store(scored, lambda s: s.dashboard("nope"))
    idle = with_store(scored, lambda s: s.dashboard(scored["idle_user"]))
    assert (idle.recommendations, idle.base_currency, idle.stale, idle.from_cache) == ([], "EUR", True, False)


def test_postgres_down_raises_store_unavailable(scored: dict[str, Any]) -> None:
    async def call() -> None:
        store = dashboard.DashboardStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "")
        try:
            await store.dashboard(str(uuid.uuid4()))
        finally:
            await store.aclose()

    with pytest.raises(pgpool.StoreUnavailable, match="unavailable"):
        asyncio.run(call())


def test_pool_is_reused_across_requests(scored: dict[str, Any]) -> None:
    async def many(store: dashboard.DashboardStore) -> int:
        await asyncio.gather(*(store.dashboard(scored["idle_user"]) for _ in range(30)))
        assert store._pg is not None
        return len(store._pg._idle)

    idle = with_store(scored, many, redis_url="")
    assert 1 <= idle <= pgpool.PG_POOL_SIZE


# --------------------------------------------------------------------------- job runs


def test_job_runs_filters_and_shape(scored: dict[str, Any]) -> None:
    rows = with_store(scored, lambda s: s.job_runs(market="XNYS"))
    assert rows and all(r["market"] == "XNYS" for r in rows)
    run = next(r for r in rows if r["id"] == scored["jobs"]["XNYS"].id)
    # every user XNYS serves on SESSION, none failed: the seed leaves no user without a price or a rate
    assert (run["status"], run["usersProcessed"], run["usersFailed"]) == ("completed", scored["served"]["XNYS"], 0)
    assert run["durationSeconds"] is not None and run["durationSeconds"] >= 0
    assert run["correlationId"] == scored["jobs"]["XNYS"].correlation_id
    assert run["ageSeconds"] is not None and run["stale"] is True  # XNYS's next session's run is long due
    assert (run["ratesStale"], run["staleReason"]) == (False, "next_run_due")  # the rates judged fresh (scored)
    started = [r["startedAt"] for r in with_store(scored, lambda s: s.job_runs(limit=500))]
    assert started == sorted(started, reverse=True)
    assert len(with_store(scored, lambda s: s.job_runs(limit=1))) == 1
    assert with_store(scored, lambda s: s.job_runs(market="'; DROP TABLE users;--")) == []
    assert all(r["status"] == "completed" for r in with_store(scored, lambda s: s.job_runs(status="completed")))
    with pytest.raises(ValueError, match="status"):
        with_store(scored, lambda s: s.job_runs(status="bogus"))


def test_market_history_per_market_oldest_first(scored: dict[str, Any]) -> None:
    history = with_store(scored, lambda s: s.market_history(30))
    assert {"XNYS", "BVMF"} <= set(history)
    for market, runs in history.items():
        assert 1 <= len(runs) <= 30 and all(r["market"] == market for r in runs)
        assert [r["startedAt"] for r in runs] == sorted(r["startedAt"] for r in runs)


# --------------------------------------------------------------------------- audit


def test_asset_events_newest_first_with_job_run_and_keyset_pages(scored: dict[str, Any]) -> None:
    symbol = scored["doc"]["recommendations"][0]["symbol"]
    with psycopg.connect(scored["pg_dsn"]) as conn:
        expected = conn.execute("SELECT count(*) FROM calculation_events WHERE event_type = 'SCORES_COMPUTED'"
                                " AND payload -> 'universe' ? %s", (symbol,)).fetchone()[0]
    assert expected >= 1
    first, cursor = with_store(scored, lambda s: s.asset_events(symbol, limit=500))
    assert len(first) == min(expected, 500)
    assert all(e["eventType"] == "SCORES_COMPUTED" and e["symbol"] == symbol for e in first)
    assert [e["createdAt"] for e in first] == sorted((e["createdAt"] for e in first), reverse=True)
    mine = [e for e in first if e["correlationId"] == scored["jobs"]["XNYS"].correlation_id]
    assert mine and mine[0]["jobRun"]["id"] == scored["jobs"]["XNYS"].id and mine[0]["score"] is not None

    pages, cursor = [], None
    while True:
        before = datetime.fromisoformat(cursor["before"]) if cursor else None
        before_id = cursor["beforeId"] if cursor else None
        page, cursor = with_store(scored, lambda s, b=before, i=before_id: s.asset_events(
            symbol, limit=7, before=b, before_id=i))
        pages.append(page)
        if cursor is None:
            break
    ids = [e["eventId"] for p in pages for e in p]
    assert len(ids) == len(set(ids)) == expected
    assert ids == [e["eventId"] for e in first][:expected]


@pytest.mark.parametrize("symbol", [pytest.param(s, id=f"hostile-{i}") for i, s in enumerate(HOSTILE_SYMBOLS)])
def test_hostile_symbols_are_just_values(scored: dict[str, Any], symbol: str) -> None:
    events, cursor = with_store(scored, lambda s: s.asset_events(symbol))
    assert (events, cursor) == ([], None)
    with psycopg.connect(scored["pg_dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] > 0
