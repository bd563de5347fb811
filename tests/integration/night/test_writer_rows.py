"""The batch writer against real Postgres: the latest rows hold each document and portfolio as calculated, whatever
their text holds, and a batch does not offer again the score rows its job run already holds."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from overnight.night import jobrun, trail, writing

HOSTILE = ['quote " back \\ slash', "tab\tnew\nline\r", "ünï €", "\u2028", "\\N", "NULL", "{brace}", ""]


def _job(conn: psycopg.Connection, session: str = "2026-12-04") -> jobrun.JobRun:
    corr, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    conn.execute("INSERT INTO overnight_job_runs (id, job_type, status, started_at, correlation_id, market,"
                 " session_date) VALUES (%s, 'scoring', 'started', now(), %s, 'XNYS', %s)", (job_id, corr, session))
    return jobrun.JobRun(job_id, corr, "XNYS", session, datetime.now(UTC).isoformat())


def _result(user_id: str, job: jobrun.JobRun, at: datetime, text: str) -> jobrun.UserResult:
    document = {"userId": user_id, "recommendations": [], "note": text, "ratesStale": text == "",
                "sessionDate": job.session_date}
    events = [("CALC_STARTED", at, {"market": job.market, "note": text}, None),
              ("CALC_COMPLETED", at + timedelta(microseconds=1), {"durationMs": 1.5}, None)]
    return jobrun.UserResult(user_id, events, document, {"totalValue": text, "allocations": []}, f"k@v{len(text)}",
                             at, 0, 0, document_json=jobrun._encode(document))


def test_the_latest_rows_hold_each_document_as_calculated(conn):
    job = _job(conn)
    at = datetime(2026, 12, 4, 3, 0, 0, 123456, tzinfo=UTC)
    results = [_result(str(uuid.uuid4()), job, at + timedelta(seconds=i), text) for i, text in enumerate(HOSTILE)]
    new = writing._write_results(conn, job, results, [])
    assert [r.user_id for r in new] == [r.user_id for r in results] and all(r.latest for r in new)
    rows = {str(u): rest for u, *rest in conn.execute(
        "SELECT user_id, job_run_id::text, correlation_id::text, session_date::text, generated_at, criteria_version,"
        " rates_stale, document, portfolio FROM recommendations WHERE job_run_id = %s", (job.id,))}
    assert rows == {r.user_id: [job.id, job.correlation_id, job.session_date, r.generated_at, r.criteria_version,
                                r.document["ratesStale"], json.loads(r.document_json), r.portfolio]
                    for r in results}
    conn.rollback()


def test_an_older_session_never_replaces_a_newer_latest_row(conn):
    newer, older = _job(conn, "2026-12-04"), _job(conn, "2026-12-03")
    uid, at = str(uuid.uuid4()), datetime(2026, 12, 4, 3, tzinfo=UTC)
    writing._write_results(conn, newer, [_result(uid, newer, at, "newer")], [])
    (late,) = writing._write_results(conn, older, [_result(uid, older, at + timedelta(hours=1), "older")], [])
    assert not late.latest  # written to the trail, not made the user's latest
    assert conn.execute("SELECT job_run_id::text, document->>'note' FROM recommendations WHERE user_id = %s",
                        (uid,)).fetchone() == (newer.id, "newer")
    conn.rollback()


def _chunk(scores: dict[str, str]) -> trail.Chunk:
    chunk = trail.Chunk()
    chunk.scores = {"tmpl@v1": dict(scores)}
    return chunk


def test_a_batch_does_not_offer_again_the_score_rows_its_job_run_holds(pg_dsn):
    """Another batch's rows are read, not inserted again: with inserts into the table blocked, a batch whose scores
    the job run holds writes its chunk at once, and one with a new asset waits for the lock (the test can fail)."""
    with psycopg.connect(pg_dsn) as conn, psycopg.connect(pg_dsn, autocommit=True) as blocker:
        job = _job(conn)
        conn.commit()
        try:
            writing._write_snapshots(conn, job, _chunk({"AAA": "1.5", "BBB": "2"}), {})  # an earlier batch's
            conn.commit()
            with blocker.transaction():
                blocker.execute("LOCK TABLE overnight_job_scores IN SHARE MODE")  # no INSERT gets through
                conn.execute("SET lock_timeout = '1s'")
                later: dict = {}  # a later batch: its first chunk has no shared scores (its users all failed)
                writing._write_snapshots(conn, job, trail.Chunk(), later)
                writing._write_snapshots(conn, job, _chunk({"BBB": "2"}), later)  # its next chunk
                conn.rollback()
                conn.execute("SET lock_timeout = '1s'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    writing._write_snapshots(conn, job, _chunk({"BBB": "2", "CCC": "3"}), {})
                conn.rollback()
            assert conn.execute("SELECT symbol, score FROM overnight_job_scores WHERE job_run_id = %s ORDER BY 1",
                                (job.id,)).fetchall() == [("AAA", "1.5"), ("BBB", "2")]
        finally:
            conn.rollback()
            conn.execute("DELETE FROM overnight_job_runs WHERE id = %s", (job.id,))
            conn.commit()
