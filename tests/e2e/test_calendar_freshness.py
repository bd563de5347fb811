"""Easter 2026 through the four markets' DAGs (dag.test()) against the local HTTP rates server serving the ECB's
real publication pattern: rates of 2026-04-01 before Thursday's publication, then 2026-04-02's until Tuesday
16:00 Berlin (no publication on Good Friday 04-03 and Easter Monday 04-06). docs/freshness.md.

Every run completes; no rates are stale because of the weekend or the ECB's holidays; the dashboard says
fresh over the weekend and on Easter Monday (London's Thursday documents until its Tuesday run + 2 h), stale
(with the reason) once a market's next run + 2 h has passed without it, and at once when that run failed.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest

from overnight.adapters.providers.db import DbPriceProvider, DbRatesProvider
from overnight.dashboard import docview
from overnight.dashboard import store as dashboard
from overnight.dev import cli
from overnight.domain import sessions
from tests.support.fake_provider import FakeProviderServer, ecb_table

pytestmark = pytest.mark.e2e

MARKETS = ("BVMF", "XLON", "XNYS", "XTKS")
ALL = MARKETS
# (session, the newest ECB publication before its runs, the markets trading that day), by hand. Every run
# precedes 16:00 Berlin on its session's date; Good Friday and Easter Monday publish nothing. Tokyo trades on
# Good Friday (its run: Thursday 22:00 UTC); London is closed on Good Friday and Easter Monday, New York and
# Sao Paulo on Good Friday.
RUNS = [
    (date(2026, 4, 2), "2026-04-01", ALL),
    (date(2026, 4, 3), "2026-04-02", ("XTKS",)),
    (date(2026, 4, 6), "2026-04-02", ("BVMF", "XNYS", "XTKS")),
    (date(2026, 4, 7), "2026-04-02", ALL),
]


# Reads on and after Easter Monday, with no run for Tuesday 04-07 yet: market -> (stale, staleReason), by hand
# from the calendars (each document is fresh until its market's next run + 2 h; docs/freshness.md):
# - XLON (04-02's document): next session Tue 04-07, open 08:00 BST = 07:00 UTC, run 05:00 UTC: fresh until
#   07:00 UTC; from 05:00 its run is due, and no row says it failed.
# - XTKS (04-06's): next session Tue 04-07, open 09:00 JST = 00:00 UTC, run Mon 22:00 UTC: fresh until Tue
#   00:00 UTC, then stale, its Tuesday run missing.
# - XNYS (04-06's): next open Tue 09:30 EDT = 13:30 UTC, run 11:30: fresh until 13:30 UTC.
# - BVMF (04-06's): next open Tue 10:00 BRT = 13:00 UTC, run 11:00: fresh until 13:00 UTC.
FRESH = (False, None)
EASTER_MONDAY_READS = {
    "2026-04-06T12:00": {"XLON": FRESH, "XTKS": FRESH, "XNYS": FRESH, "BVMF": FRESH},
    "2026-04-07T06:59": {"XLON": FRESH, "XTKS": (True, "run_missing"), "XNYS": FRESH, "BVMF": FRESH},
    "2026-04-07T07:01": {"XLON": (True, "run_missing"), "XTKS": (True, "run_missing"), "XNYS": FRESH,
                         "BVMF": FRESH},
}


@pytest.fixture
def rates_server(pg_dsn: str, seeded: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProviderServer]:
    """The local Frankfurter: the seeded rates, dated as the test says; the runs' rates connection points at it."""
    with psycopg.connect(pg_dsn) as conn:
        currencies = sorted({r[0].strip() for r in conn.execute("SELECT currency FROM assets")} | {"EUR", "USD"})
        stored = DbRatesProvider(conn).fetch_rates("USD", currencies)
        symbols = [r[0] for r in conn.execute("SELECT symbol FROM assets")]
        quotes = DbPriceProvider(conn).fetch_prices(symbols)
    server = FakeProviderServer(rates=ecb_table(stored.rates),  # as the ECB publishes them: base EUR
                                prices={s: (str(q.price), q.currency) for s, q in quotes.items()}).start()
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", server.base_url)
    try:
        yield server
    finally:
        server.stop()


def _read(pg_dsn: str, redis_url: str, user_id: str, now: datetime) -> docview.DashboardView:
    async def go() -> docview.DashboardView:
        store = dashboard.DashboardStore(pg_dsn=pg_dsn, redis_url=redis_url)
        try:
            return await store.dashboard(user_id, now=now)
        finally:
            await store.aclose()
    return asyncio.run(go())


def _a_user_served_by(conn: psycopg.Connection, market: str, session: date) -> str:
    rows = conn.execute("SELECT user_id::text FROM recommendations WHERE document->>'market' = %s"
                        " AND document->>'sessionDate' = %s ORDER BY user_id LIMIT 1",
                        (market, session.isoformat())).fetchall()
    assert rows, f"no {market} document for {session}"
    return rows[0][0]


@pytest.mark.slow  # every market's DAG run for each session around Easter: a minute and more
def test_easter_2026_all_four_markets(pg_dsn: str, seeded: dict[str, int], airflow_db: None,
                                      rates_server: FakeProviderServer, redis_client: Any) -> None:
    redis_url = os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"]
    with psycopg.connect(pg_dsn) as conn:  # these April sessions' documents must be the dashboard's: the latest
        # rows of newer sessions other tests left go first (an older session never replaces a newer document)
        conn.execute("DELETE FROM recommendations WHERE session_date > %s", (RUNS[0][0],))
    assert {(c, s) for s, _, codes in RUNS for c in codes} == {
        (c, s) for s, _, _ in RUNS for c in MARKETS if sessions.is_session(c, s)}  # exchange-calendars agrees
    results: dict[tuple[str, date], dict[str, Any]] = {}
    for session, rates_date, codes in RUNS:
        rates_server.rates_date = rates_date
        for code in codes:
            results[(code, session)] = cli.run_market(code, session, force=True, quiet=True)
        if session == date(2026, 4, 3):
            # Good Friday, Saturday, Sunday: the latest documents (Thursday's; Tokyo's of Friday) stay fresh,
            # from Redis or from Postgres
            with psycopg.connect(pg_dsn) as conn:
                users = {code: _a_user_served_by(conn, code, date(2026, 4, 3 if code == "XTKS" else 2))
                         for code in MARKETS}
            for moment in ("2026-04-03T12:00", "2026-04-04T12:00", "2026-04-05T20:00"):
                now = datetime.fromisoformat(moment).replace(tzinfo=UTC)
                for code, uid in users.items():
                    view = _read(pg_dsn, redis_url, uid, now)
                    assert (code, moment, view.stale, view.stale_reason) == (code, moment, False, None)
                    redis_client.delete(f"recs:{uid}")  # the key expired: the Postgres fallback is as fresh
                    view = _read(pg_dsn, redis_url, uid, now)
                    assert (code, moment, view.from_cache, view.stale) == (code, moment, False, False)
        if session == date(2026, 4, 6):
            # Easter Monday, after its runs (New York, Sao Paulo, Tokyo) and before any of Tuesday's. London is
            # closed: its latest documents are still Thursday 04-02's, fresh until its Tuesday run is due.
            with psycopg.connect(pg_dsn) as conn:
                users = {code: _a_user_served_by(conn, code, date(2026, 4, 2 if code == "XLON" else 6))
                         for code in MARKETS}
            for moment, answers in EASTER_MONDAY_READS.items():
                now = datetime.fromisoformat(moment).replace(tzinfo=UTC)
                for code, uid in users.items():
                    view = _read(pg_dsn, redis_url, uid, now)  # from Redis while the key lives
                    assert (code, moment, view.stale, view.stale_reason) == (code, moment, *answers[code])
                    redis_client.delete(f"recs:{uid}")  # the key expired: the Postgres fallback says the same
                    view = _read(pg_dsn, redis_url, uid, now)
                    assert (code, moment, view.from_cache, view.stale, view.stale_reason) == (
                        code, moment, False, *answers[code])

    assert len(results) == 4 + 1 + 3 + 4
    summary = {k: (r["status"], r["metrics"]["rates_stale"], r["metrics"]["rates_missing"], r["failed"])
               for k, r in results.items()}
    assert summary == {k: ("completed", False, [], 0) for k in results}
    assert all(r["processed"] > 0 for r in results.values())
    published = {"2026-04-01": "2026-04-01T14:00:00+00:00", "2026-04-02": "2026-04-02T14:00:00+00:00"}  # 16:00 CEST
    assert {k: r["metrics"]["rates_as_of"] for k, r in results.items()} == {
        (c, s): published[rates_date] for s, rates_date, codes in RUNS for c in codes}
    with psycopg.connect(pg_dsn) as conn:
        corr = [r["correlation_id"] for r in results.values()]
        stale_docs = conn.execute("SELECT count(*) FROM recommendations WHERE correlation_id = ANY(%s::uuid[])"
                                  " AND (rates_stale OR (document->>'ratesStale')::boolean)", (corr,)).fetchone()[0]
        assert stale_docs == 0
        assert conn.execute("SELECT count(*) FROM recommendations WHERE correlation_id = ANY(%s::uuid[])",
                            (corr,)).fetchone()[0] > 0

        # Wednesday 2026-04-08: no run happened for it. Each market's latest documents are fresh until that
        # run + 2 h, then stale because the run is missing; a failed run says so.
        xnys = _a_user_served_by(conn, "XNYS", date(2026, 4, 7))
    before = datetime(2026, 4, 8, 13, 29, tzinfo=UTC)  # XNYS opens 13:30 UTC (EDT): run 11:30 + 2 h
    after = datetime(2026, 4, 8, 13, 31, tzinfo=UTC)
    failed_at = datetime(2026, 4, 8, 11, 35, tzinfo=UTC)  # the run is due at 11:30 and fails at 11:35
    assert _read(pg_dsn, redis_url, xnys, failed_at).stale is False  # due, no row yet: fresh
    assert _read(pg_dsn, redis_url, xnys, before).stale is False
    view = _read(pg_dsn, redis_url, xnys, after)
    assert (view.stale, view.stale_reason) == (True, "run_missing")
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO overnight_job_runs (id, job_type, status, started_at, completed_at, correlation_id,"
                     " market, session_date, users_processed, users_failed) VALUES (%s, 'scoring', 'failed',"
                     " %s, %s, %s, 'XNYS', '2026-04-08', 0, 0)",
                     (uuid.uuid4(), failed_at, failed_at, uuid.uuid4()))
        conn.commit()
    # Stale at once, not only from 13:30 (docs/freshness.md: a failed run makes its documents stale at once)
    for now in (failed_at, before, after):
        view = _read(pg_dsn, redis_url, xnys, now)
        assert (now, view.stale, view.stale_reason) == (now, True, "run_failed")


def test_cache_ttl_until_the_next_run(pg_dsn: str, seeded: dict[str, int], airflow_db: None, redis_client: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # OVERNIGHT_CACHE_TTL=next-run: Friday 2027-12-10's XNYS keys live until Monday 2027-12-13's run (12:30 UTC,
    # the NYSE opens 09:30 EST) + 2 h; the default stays 24 h. The run's clock is the test's: Friday 21:00 UTC, after
    # the close (time-machine), so the TTL is the same whatever the day the test runs.
    import time

    import time_machine

    from tests.support import reliability as R

    friday = date(2027, 12, 10)
    monkeypatch.setenv("OVERNIGHT_CACHE_TTL", "next-run")
    clock = datetime(2027, 12, 10, 21, 0, tzinfo=UTC)
    # on a database of its own (the shared data set's copy): a job run started at that clock would be every later
    # test's newest XNYS run
    with R.scratch_database("ttl", users=600) as dsn:
        monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", dsn)
        started = time.monotonic()
        with time_machine.travel(clock, tick=True):
            result = cli.run_market("XNYS", friday, force=True, quiet=True)
        assert result["status"] == "completed"
        with psycopg.connect(dsn) as conn:
            uid = _a_user_served_by(conn, "XNYS", friday)
        due = (datetime(2027, 12, 13, 14, 30, tzinfo=UTC) - clock).total_seconds()  # 2 days 17 h 30 min
        for key in (f"recs:{uid}", f"portfolio:{uid}"):
            ttl, elapsed = redis_client.ttl(key), time.monotonic() - started  # Redis counted down in real time
            assert due - elapsed - 1 <= ttl <= due, (key, ttl, due, elapsed)
        monkeypatch.delenv("OVERNIGHT_CACHE_TTL")
        cli.run_market("XNYS", friday, force=True, quiet=True)
        assert 24 * 3600 - 120 < redis_client.ttl(f"recs:{uid}") <= 24 * 3600
