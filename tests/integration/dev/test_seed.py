"""The seeder: deterministic, realistic, and every reference holds."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from overnight.dev import seed
from tests.conftest import RUN_ID
from tests.support import databases

# Every table the seeder fills, each row whole but for the columns the database dates itself (now()).
SEEDED_TABLES = ("asset_classes", "assets", "prices", "exchange_rates", "criteria_sets", "users",
                 "allocation_targets", "holdings", "watchlist")


def _fingerprint(c: psycopg.Connection) -> tuple:
    return tuple(
        c.execute(q).fetchone()[0]
        for q in (
            "SELECT md5(string_agg(id::text || markets::text || criteria_key || coalesce(default_contribution::text,''),"
            " ',' ORDER BY id)) FROM users",
            "SELECT md5(string_agg(user_id::text || asset_id || quantity, ',' ORDER BY user_id, asset_id)) FROM holdings",
            "SELECT md5(string_agg(criteria_key || version || rules::text, ',' ORDER BY criteria_key, version))"
            " FROM criteria_sets",
        )
    )


def test_seed_invariants(conn, seeded):
    c = conn
    assert c.execute("SELECT count(*) FROM users").fetchone()[0] == 600 == seeded["users"]
    assert c.execute("SELECT count(DISTINCT currency) FROM assets").fetchone()[0] >= 4
    assert {r[0] for r in c.execute("SELECT DISTINCT market FROM assets")} >= {"XNYS", "BVMF", "XLON", "XTKS"}
    # every holding's and watchlist entry's asset exists, and every held asset has a price
    assert c.execute("SELECT count(*) FROM holdings h LEFT JOIN assets a ON a.id = h.asset_id"
                     " WHERE a.id IS NULL").fetchone()[0] == 0
    assert c.execute("SELECT count(*) FROM watchlist w LEFT JOIN assets a ON a.id = w.asset_id"
                     " WHERE a.id IS NULL").fetchone()[0] == 0
    assert c.execute("SELECT count(*) FROM holdings h LEFT JOIN prices p ON p.asset_id = h.asset_id"
                     " WHERE p.asset_id IS NULL").fetchone()[0] == 0
    # 10-50 holdings each (an unpriced pick moves to the watchlist, so a few have slightly fewer)
    lo, hi = c.execute("SELECT min(n), max(n) FROM (SELECT count(*) n FROM holdings GROUP BY user_id) s").fetchone()
    assert 8 <= lo and hi <= 50
    assert c.execute("SELECT max(n) FROM (SELECT count(*) n FROM watchlist GROUP BY user_id) s").fetchone()[0] <= 52
    # held assets are in the user's markets; 1-3 markets each
    assert c.execute("SELECT count(*) FROM holdings h JOIN assets a ON a.id = h.asset_id JOIN users u"
                     " ON u.id = h.user_id WHERE NOT a.market = ANY(u.markets)").fetchone()[0] == 0
    assert c.execute("SELECT min(cardinality(markets)), max(cardinality(markets)) FROM users").fetchone() == (1, 3)
    # targets valid: min <= max, minimums add to at most 100
    assert c.execute("SELECT count(*) FROM allocation_targets WHERE min_pct > max_pct OR max_pct > 100").fetchone()[0] == 0
    assert c.execute("SELECT max(s) FROM (SELECT sum(min_pct) s FROM allocation_targets GROUP BY user_id) t"
                     ).fetchone()[0] <= 100
    # most users share a template, some have criteria of their own, every key has a version
    shared = c.execute("SELECT avg((criteria_key LIKE 'tpl-%')::int) FROM users").fetchone()[0]
    assert 0.7 < shared < 0.95
    assert c.execute("SELECT count(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM criteria_sets s"
                     " WHERE s.criteria_key = u.criteria_key)").fetchone()[0] == 0
    assert c.execute("SELECT min(jsonb_array_length(rules)), max(jsonb_array_length(rules)) FROM criteria_sets"
                     ).fetchone() >= (5, 5)


def test_same_seed_same_rows_other_seed_other_rows(pg_dsn, seeded):
    with psycopg.connect(pg_dsn) as c:
        before = _fingerprint(c)
        seed.seed(c, 600, 7, dsn=pg_dsn)
        assert _fingerprint(c) == before
        seed.seed(c, 600, 8, dsn=pg_dsn)
        assert _fingerprint(c) != before
        seed.seed(c, 600, 7, dsn=pg_dsn)  # leave the session's data set as the fixture made it
        assert _fingerprint(c) == before


def _checksums(c: psycopg.Connection) -> dict[str, tuple]:
    return {t: c.execute(f"SELECT count(*), md5(string_agg(x, ',' ORDER BY x)) FROM"
                         f" (SELECT (to_jsonb(t) - 'created_at' - 'fetched_at')::text x FROM {t} t) s").fetchone()
            for t in SEEDED_TABLES}


def test_chunk_size_changes_no_row():
    """The seeder streams a chunk of users at a time: the chunk's size changes no row of any table (3,000
    users in chunks of 700, the last one short, against the default chunk and against one chunk per user)."""
    name = f"ovt_{RUN_ID}_seed_chunks"
    dsn = databases.clone(databases.app_template(), name)
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    try:
        with psycopg.connect(dsn) as c:
            counts = seed.seed(c, 3000, 11, dsn=dsn, now=now)
            default = _checksums(c)
            assert seed.seed(c, 3000, 11, dsn=dsn, now=now, chunk_users=700) == counts
            assert _checksums(c) == default
            assert seed.seed(c, 3000, 11, dsn=dsn, now=now, chunk_users=1) == counts
            assert _checksums(c) == default
        assert counts["users"] == 3000 and counts["criteria_sets"] > seed.N_TEMPLATES
        assert {t: n for t, (n, _) in default.items() if t in counts} == counts
    finally:
        databases.drop(name)
