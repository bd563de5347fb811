"""`/audit/assets/{symbol}` is served by indexes, not by a scan of the trail, in each of its query shapes (the
first page, a page before a time, a page after an event), for a symbol held by many users and for a rare one:
EXPLAIN of the store's own SQL (`asset_events_query`) on a seeded database whose trail holds a few nights of a
market, statistics fresh (ANALYZE, as autovacuum leaves them). A viewer may call it; a query that could only scan
the trail would let a few calls keep Postgres busy until their statement timeout. A page reads at most `limit + 1`
chunks: the plan has that limit on the chunks it unpacks.

A test trail is a few thousand rows, which Postgres rightly reads whole; on the trail of a real night (400,000
events per 100,000 users, every night for two years) a sequential scan costs a thousand times more. So the
plans are asked with sequential scans priced out (`enable_seqscan = off`, which makes the planner choose an
index wherever one serves the query): a shape no index serves still shows a sequential scan, and fails."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

import psycopg
import pytest

from overnight.dashboard.store import asset_events_query
from tests.support.pipeline_run import run_market


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


@pytest.fixture(scope="module")
def trail(pg_dsn: str, seeded: dict[str, int]) -> dict[str, Any]:
    for session in (date(2026, 11, 23), date(2026, 11, 24), date(2026, 11, 25)):
        run_market(pg_dsn, "XNYS", session, "test-audit-plans", batch_size=500)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ANALYZE calculation_chunks")
        conn.execute("ANALYZE calculation_events_rows")
        counts = conn.execute(
            "SELECT s, count(*) FROM calculation_events, jsonb_array_elements_text(payload -> 'universe') s"
            " WHERE event_type = 'SCORES_COMPUTED' GROUP BY s ORDER BY count(*) DESC, s").fetchall()
        total = conn.execute("SELECT count(*) FROM calculation_events").fetchone()[0]
    sql, params = asset_events_query(counts[0][0], 11)
    with psycopg.connect(pg_dsn) as conn:
        last = conn.execute(sql, params).fetchall()[-1]  # the 11th of the API's order: a cursor inside the trail
    return {"popular": counts[0], "rare": counts[-1], "before": last[4], "before_id": str(last[0]), "total": total}


@pytest.mark.parametrize("which", ["popular", "rare"])
@pytest.mark.parametrize("shape", ["first-page", "before-time", "before-time-and-id"])
def test_every_audit_query_shape_is_served_by_an_index(pg_dsn: str, trail: dict[str, Any], which: str,
                                                        shape: str) -> None:
    symbol, holders = trail[which]
    assert trail["total"] >= 4 * 3 * 100 and holders >= 1  # three nights of the market's users, four events each
    before: datetime | None = trail["before"] if shape != "first-page" else None
    before_id = trail["before_id"] if shape == "before-time-and-id" else None
    sql, params = asset_events_query(symbol, 51, before, before_id)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()[0][0]["Plan"]
        rows = conn.execute(sql, params).fetchall()
    nodes = _nodes(plan)
    scanned = [n for n in nodes if str(n.get("Relation Name", "")).startswith(("calculation_chunks",
                                                                                "calculation_events"))]
    assert {n["Relation Name"].rsplit("_", 2)[0] for n in scanned} >= {"calculation_chunks"}, json.dumps(plan)[:2000]
    seq = [n["Relation Name"] for n in scanned if n["Node Type"] == "Seq Scan"]
    assert not seq, f"{which} {symbol} ({holders} events), {shape}: sequential scan of {seq}: {json.dumps(plan)[:3000]}"
    kinds = {n["Node Type"] for n in scanned}
    assert kinds <= {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, kinds
    for n in scanned:  # a bitmap heap scan reads the pages an index scan found
        assert n["Node Type"] != "Bitmap Heap Scan" or "Index" in n["Plans"][0]["Node Type"], n
    assert rows and len(rows) <= 51  # and it answers
    if before_id is not None:  # after an event: not that event again
        assert before_id not in {str(r[0]) for r in rows}
