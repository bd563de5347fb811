"""A differential run (issue 22): the same world two nights running, one thing broken the second night (a held
asset's quote is gone). Its holders are valued at the newest price known for it, the first night's, and say so
(`lastKnownPrices`); everyone whose universe does not hold or watch it gets exactly the first night's amounts."""

from __future__ import annotations

from datetime import UTC, date

import psycopg

from overnight.night import jobrun
from tests.support import reliability as R
from tests.support.pipeline_run import run_pipeline

NIGHT_1, NIGHT_2 = date(2027, 2, 9), date(2027, 2, 10)  # a Tuesday and a Wednesday of XNYS no other test uses


def _documents(conn: psycopg.Connection, job_id: str) -> dict[str, dict]:
    return {str(u): d for u, d in conn.execute(
        "SELECT user_id, document::jsonb FROM recommendation_history WHERE job_run_id = %s", (job_id,))}


def test_a_quote_gone_overnight_values_its_holders_at_the_newest_known_price_and_changes_nobody_else() -> None:
    with R.scratch_database("missingquote", users=300) as dsn, psycopg.connect(dsn) as conn:
        served = R.served(conn, "XNYS", NIGHT_1)
        assert served == R.served(conn, "XNYS", NIGHT_2)
        first = run_pipeline(conn, "XNYS", NIGHT_1, "test-missing-quote-1", force=True)
        # the XNYS asset held by the fewest served users (but some): its quote goes missing the second night
        asset, symbol = conn.execute(
            "SELECT a.id, a.symbol FROM holdings h JOIN assets a ON a.id = h.asset_id WHERE a.market = 'XNYS'"
            " AND h.quantity > 0 AND h.user_id = ANY(%s::uuid[]) GROUP BY a.id, a.symbol"
            " ORDER BY count(*), a.symbol LIMIT 1", (sorted(served),)).fetchone()
        price, currency, as_of = conn.execute(
            "SELECT price, currency, as_of FROM overnight_job_prices WHERE job_run_id = %s AND symbol = %s",
            (first.job.id, symbol)).fetchone()
        holders = {str(r[0]) for r in conn.execute(
            "SELECT user_id FROM holdings WHERE asset_id = %s AND quantity > 0", (asset,))} & served
        watchers = {str(r[0]) for r in conn.execute(
            "SELECT user_id FROM watchlist WHERE asset_id = %s UNION SELECT user_id FROM holdings WHERE asset_id = %s",
            (asset, asset))} & served
        conn.execute("DELETE FROM prices WHERE asset_id = %s", (asset,))
        conn.commit()
        second = run_pipeline(conn, "XNYS", NIGHT_2, "test-missing-quote-2", force=True)
        before, after = _documents(conn, first.job.id), _documents(conn, second.job.id)

    assert holders and served - watchers, "the test needs holders and users it does not concern"
    assert second.summary["users_failed"] == 0 and set(after) == set(before) == served
    expected = [{"symbol": symbol, "price": jobrun._num(price), "currency": currency.strip(),
                 "asOf": as_of.astimezone(UTC).isoformat()}]
    for u in holders:  # valued as the night before (same prices, the missing one at its last known), and told so
        assert after[u]["lastKnownPrices"] == expected, u
        assert after[u]["portfolioSummary"] == before[u]["portfolioSummary"], u
        assert symbol not in {r["symbol"] for r in after[u]["recommendations"]}  # never bought on an old price
    assert not any("lastKnownPrices" in after[u] for u in served - holders)
    for u in served - watchers:  # nothing of theirs changed: the same amounts, to the minor unit
        assert [(r["symbol"], r["amount"]) for r in after[u]["recommendations"]] == \
            [(r["symbol"], r["amount"]) for r in before[u]["recommendations"]], u
        assert after[u]["unallocated"] == before[u]["unallocated"], u
