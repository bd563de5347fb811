"""The benchmark's world is the same at any hour: its quotes are dated after their market's last close."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from overnight.dev import bench
from overnight.domain import freshness
from tests.conftest import RUN_ID
from tests.support import databases

# Monday 7 December 2026, 21:30 UTC: New York closed at 16:00 EST = 21:00 UTC, London at 16:30 GMT = 16:30 UTC
# that day (hand-known hours, not read from the code), Tokyo's close was that morning, before 15:30 UTC.
MOMENT = datetime(2026, 12, 7, 21, 30, tzinfo=UTC)
SEEDED_AT = MOMENT - timedelta(hours=6)  # 15:30 UTC: after Tokyo's close, before London's and New York's


def _quotes(c: psycopg.Connection) -> dict[str, tuple[datetime, str]]:
    return {s: (t, m) for s, t, m in c.execute(
        "SELECT a.symbol, p.as_of, a.market FROM prices p JOIN assets a ON a.id = p.asset_id")}


def test_quotes_are_dated_after_their_markets_last_close():
    name = f"ovt_{RUN_ID}_bench_world"
    dsn = databases.clone(databases.app_template(databases.SEEDED_USERS, databases.SEED), name)
    try:
        with psycopg.connect(dsn) as c:
            c.execute("UPDATE prices SET as_of = %s", (SEEDED_AT,))
            c.commit()
            before = _quotes(c)
            stale, _ = freshness.judge_quotes(before, MOMENT)
            # the differential: as seeded, the hour makes New York's, London's and B3's quotes stale
            assert {before[s][1] for s in stale} == {"XNYS", "XLON", "BVMF"}
            moved = bench.quotes_after_closes(c, ["BVMF", "XLON", "XNYS", "XTKS"], MOMENT)
            after = _quotes(c)
        assert moved == sum(1 for _, m in before.values() if m != "XTKS") > 0
        by_market: dict[str, set[datetime]] = {}
        for t, m in after.values():
            by_market.setdefault(m, set()).add(t)
        assert by_market["XNYS"] == {datetime(2026, 12, 7, 21, 0, tzinfo=UTC)}
        assert by_market["XLON"] == {datetime(2026, 12, 7, 16, 30, tzinfo=UTC)}
        assert by_market["XTKS"] == {SEEDED_AT}  # after its close already: untouched
        (b3,) = by_market["BVMF"]
        assert SEEDED_AT < b3 <= MOMENT
        assert freshness.judge_quotes(after, MOMENT) == (set(), set())
    finally:
        databases.drop(name)
