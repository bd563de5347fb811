"""The batch writer's chunk rows round-trip through real Postgres, whatever the symbols and payloads hold: the
views give back each event and document as written, and each event's id names its chunk and positions."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from overnight.night import jobrun, trail, writing

SYMBOLS = ["AAPL", "BRK.B", 'A"B', "C\\D", "tab\there", "new\nline", "com,ma", "{brace}", "sp ace", "ünï", "NULL", ""]
PAYLOADS = [{"a": 'quote " back \\ slash', "b": "tab\tnew\nline\r", "c": ["ünï", None, 1.5], "d": "\u2028"}, {}]


def test_chunk_rows_round_trip_through_the_views(conn):
    corr, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    conn.execute("INSERT INTO overnight_job_runs (id, job_type, status, started_at, correlation_id, market,"
                 " session_date) VALUES (%s, 'scoring', 'started', now(), %s, 'XNYS', '2026-12-04')", (job_id, corr))
    job = jobrun.JobRun(job_id, corr, "XNYS", "2026-12-04", datetime.now(UTC).isoformat())
    t0 = datetime(2026, 12, 4, 3, 0, 0, 123456, tzinfo=UTC)
    users = [str(uuid.uuid4()) for _ in range(3)]
    events = {u: [(t, t0 + timedelta(microseconds=7 * i + j), PAYLOADS[(i + j) % 2], None)
                  for j, t in enumerate(("CALC_STARTED", "CALC_FAILED"))] for i, u in enumerate(users)}
    docs = [json.dumps({"userId": u, "s": SYMBOLS}, ensure_ascii=False) for u in users]
    chunk = trail.compact((u, events[u], False) for u in users)
    chunk.symbols.update(SYMBOLS)
    writing._write_chunk(conn, job, chunk, docs, [t0] * 3)
    rows = conn.execute("SELECT user_id::text, event_type, payload, created_at, event_id::text FROM calculation_events"
                        " WHERE correlation_id = %s ORDER BY created_at, event_id", (corr,)).fetchall()
    assert [(u, t, p, at) for u, t, p, at, _ in rows] == sorted(
        ((u, t, json.loads(json.dumps(p)), at) for u in users for t, at, p, _ in events[u]), key=lambda r: r[3])
    chunk_id, symbols = conn.execute("SELECT chunk_id::text, symbols FROM calculation_chunks WHERE correlation_id = %s",
                                     (corr,)).fetchone()
    assert symbols == sorted(SYMBOLS)
    for u, t, _, _, eid in rows:  # an event's id: its chunk's, then its user's position and its own (1-based)
        assert eid[:31] == chunk_id[:31] and uuid.UUID(eid).version == 4
        assert int(eid[31:], 16) == (users.index(u) + 1) << 3 | (1 if t == "CALC_STARTED" else 2)
    history = conn.execute("SELECT user_id::text, document, generated_at FROM recommendation_history"
                           " WHERE job_run_id = %s ORDER BY document", (job_id,)).fetchall()
    assert history == sorted(((u, d, t0) for u, d in zip(users, docs, strict=True)), key=lambda r: r[1])
    conn.rollback()
