"""Price freshness (docs/freshness.md) through real batches: a quote older than its market's previous close is
flagged in the documents (`stalePrices`) and counted in the job run's metrics; one more sessions of its
market behind than allowed is unusable: never scored or bought, and its holders are valued at the newest price
known for it (docs/allocation.md)."""

from __future__ import annotations

from datetime import UTC, date, datetime

import psycopg
import pytest

from overnight.domain import freshness
from overnight.night import jobrun
from tests.support import reliability as R
from tests.support.pipeline_run import run_pipeline

SESSION = date(2026, 12, 15)  # a Tuesday no other test runs; XNYS opens 09:30 EST = 14:30 UTC, runs 12:30 UTC
MOMENT = datetime(2026, 12, 15, 12, 30, tzinfo=UTC)
MONDAY_CLOSE = datetime(2026, 12, 14, 21, 0, tzinfo=UTC)  # NYSE closes 16:00 EST
BEFORE_CLOSE = datetime(2026, 12, 14, 20, 59, tzinfo=UTC)
# Tuesday 1 December's close: 2, 3, 4, 7, 8, 9, 10, 11 and 14 December closed since, 9 sessions behind (more than 5)
TWO_WEEKS_OLD = datetime(2026, 12, 1, 21, 0, tzinfo=UTC)


def _users_of(conn: psycopg.Connection, table: str, symbol: str, users: set[str]) -> set[str]:
    return {str(r[0]) for r in conn.execute(
        f"SELECT DISTINCT t.user_id FROM {table} t JOIN assets a ON a.id = t.asset_id WHERE a.symbol = %s",
        (symbol,)) if str(r[0]) in users}


@pytest.fixture
def dated_prices(conn: psycopg.Connection, seeded: dict[str, int]):
    """Every price at Monday's NYSE close, but one a minute before it and one two weeks old; restored after."""
    saved = conn.execute("SELECT asset_id, as_of FROM prices").fetchall()
    served = R.served(conn, "XNYS", SESSION)
    held = conn.execute(
        "SELECT a.symbol, count(DISTINCT h.user_id) FROM holdings h JOIN assets a ON a.id = h.asset_id"
        " WHERE h.user_id = ANY(%s::uuid[]) AND a.market = 'XNYS' GROUP BY a.symbol ORDER BY 2, 1",
        (sorted(served),)).fetchall()
    stale, ancient = held[0][0], held[1][0]
    conn.execute("UPDATE prices SET as_of = %s", (MONDAY_CLOSE,))
    conn.execute("UPDATE prices p SET as_of = %s FROM assets a WHERE a.id = p.asset_id AND a.symbol = %s",
                 (BEFORE_CLOSE, stale))
    conn.execute("UPDATE prices p SET as_of = %s FROM assets a WHERE a.id = p.asset_id AND a.symbol = %s",
                 (TWO_WEEKS_OLD, ancient))
    conn.commit()
    try:
        yield served, stale, ancient
    finally:
        conn.rollback()
        with conn.cursor() as cur:
            cur.executemany("UPDATE prices SET as_of = %s WHERE asset_id = %s", [(a, i) for i, a in saved])
        conn.commit()


def test_stale_quotes_are_flagged_and_unusable_ones_value_their_holders_at_the_newest_known_price(
        conn, dated_prices) -> None:
    served, stale, ancient = dated_prices
    # the newest price known for the unusable quote's asset: that quote itself, or an earlier job run's if newer
    quote = conn.execute("SELECT p.price, p.currency, p.as_of FROM prices p JOIN assets a ON a.id = p.asset_id"
                         " WHERE a.symbol = %s", (ancient,)).fetchone()
    earlier = conn.execute("SELECT price, currency, as_of FROM overnight_job_prices WHERE symbol = %s"
                           " ORDER BY as_of DESC LIMIT 1", (ancient,)).fetchone()
    price, currency, as_of = earlier if earlier is not None and earlier[2] > quote[2] else quote
    run = run_pipeline(conn, "XNYS", SESSION, "test-price-freshness", force=True,
                       judge_prices=lambda q: freshness.judge_quotes(q, MOMENT))
    job, summary = run.job, run.summary

    holders = _users_of(conn, "holdings", ancient, served)
    assert holders and holders != served
    failed = dict(conn.execute("SELECT user_id::text, stage FROM overnight_job_users WHERE job_run_id = %s"
                               " AND status = 'failed'", (job.id,)).fetchall())
    assert failed == {}  # nobody fails for an old quote any more (docs/allocation.md)
    assert summary["status"] == "completed" and summary["users_processed"] == len(served)
    assert (summary["stale_prices"], summary["stale_price_symbols"], summary["unusable_prices"]) == (1, [stale], 1)
    details = conn.execute("SELECT error_details FROM overnight_job_runs WHERE id = %s", (job.id,)).fetchone()[0]
    assert details["prices"]["unusable"] == [ancient]
    known = dict(conn.execute("SELECT user_id::text, document::jsonb->'lastKnownPrices' FROM recommendation_history"
                              " WHERE job_run_id = %s", (job.id,)).fetchall())
    # its holders' documents list it, valued at that price of that date; nobody else's does
    assert {u for u, k in known.items() if k} == holders
    expected = {"symbol": ancient, "price": jobrun._num(price), "currency": currency.strip(),
                "asOf": as_of.astimezone(UTC).isoformat()}
    assert all(known[u] == [expected] for u in holders), [known[u] for u in sorted(holders)][:2]

    # The stale quote's symbol is in the documents of the users who hold or watch it (it is an XNYS asset,
    # so in scope for them), and in no other document.
    docs = dict(conn.execute("SELECT user_id::text, document::jsonb->'stalePrices' FROM recommendation_history"
                             " WHERE job_run_id = %s", (job.id,)).fetchall())
    concerned = _users_of(conn, "holdings", stale, served) | _users_of(conn, "watchlist", stale, served)
    assert concerned
    assert {u for u, s in docs.items() if s == [stale]} == concerned
    assert {u for u, s in docs.items() if s == []} == set(docs) - concerned
