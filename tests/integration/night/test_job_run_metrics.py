"""Metrics over the whole job run (issue 27): whichever execution computed each user, a job run whose batch died
twice mid-way reports what a clean run of the same users reports; each execution has its own row."""

from __future__ import annotations

from datetime import date

import psycopg
import pytest

from overnight.night import jobrun, writing
from tests.support import pipeline_run
from tests.support.failing_prices import ProviderDownFor

MARKET = "XLON"
SESSION = date(2026, 10, 15)  # a Thursday; no other test runs this session
CHUNK = 20  # users a chunk loads, calculates and commits together
COUNTED = ("users_total", "batches", "batches_failed", "assets_scored", "recommendations_generated",
           "users_with_warnings", "cache_status")


def _first_chunk_of_each_symbol(conn: psycopg.Connection, served: list[str]) -> dict[str, int]:
    """For each symbol the served users hold or watch: the chunk (of CHUNK users, in id order) that first needs it."""
    rows = conn.execute(
        "SELECT x.user_id::text, a.symbol FROM (SELECT user_id, asset_id FROM holdings UNION ALL"
        " SELECT user_id, asset_id FROM watchlist) x JOIN assets a ON a.id = x.asset_id"
        " WHERE x.user_id = ANY(%s::uuid[])", (served,)).fetchall()
    position = {u: i // CHUNK for i, u in enumerate(served)}
    first: dict[str, int] = {}
    for uid, symbol in rows:
        first[symbol] = min(first.get(symbol, position[uid]), position[uid])
    return first


def test_a_job_run_retried_twice_reports_a_clean_runs_metrics(conn: psycopg.Connection, seeded: dict[str, int]
                                                              ) -> None:
    where, params = pipeline_run.audience(MARKET, SESSION).where()
    served = [r[0] for r in conn.execute(f"SELECT u.id::text FROM users u WHERE {where} ORDER BY u.id", params)]
    assert len(served) > 4 * CHUNK
    first = _first_chunk_of_each_symbol(conn, served)
    # two symbols first needed by chunks 1 and 3 (0-based): the first execution dies in chunk 1, the second in 3
    dies_at = {k: sorted(s for s, c in first.items() if c == k) for k in (1, 3)}
    assert dies_at[1] and dies_at[3], first

    clean = pipeline_run.run_pipeline(conn, MARKET, SESSION, "clean-run", force=True, batch_size=1000,
                                      chunk_size=CHUNK)
    assert clean.summary["status"] == "completed" and clean.summary["executions"] == 1

    job = None
    for attempt, down in ((1, dies_at[1][:1]), (2, dies_at[3][:1]), (3, [])):
        # each execution as a DAG run does it: start (continue the job run), plan, the batch, finalize (ALL_DONE)
        job = jobrun.start_job(conn, MARKET, SESSION, f"retried-run-{attempt}", force=attempt == 1)
        assert job.attempt == attempt
        run = pipeline_run.start(conn, MARKET, SESSION, job=job, batch_size=1000)
        assert len(run.batches) == 1
        run = pipeline_run.score_all(conn, run, prices=ProviderDownFor(conn, set(down)), tolerate=(ConnectionError,),
                                     chunk_size=CHUNK)
        assert (run.results == [None]) == bool(down)
        done = conn.execute("SELECT count(*) FROM overnight_job_users WHERE job_run_id = %s AND status = 'completed'",
                            (job.id,)).fetchone()[0]
        assert done == min(len(served), CHUNK * {1: 1, 2: 3, 3: len(served)}[attempt])  # chunks before the failure
    retried = run.summary
    assert job is not None and job.id != clean.job.id

    assert {k: retried[k] for k in COUNTED} == {k: clean.summary[k] for k in COUNTED}
    assert (retried["status"], retried["users_processed"], retried["users_failed"]) == (
        clean.summary["status"], clean.summary["users_processed"], clean.summary["users_failed"]) == (
        "completed", len(served), 0)
    assert retried["executions"] == 3
    stored = conn.execute("SELECT metrics FROM overnight_job_runs WHERE id = %s", (job.id,)).fetchone()[0]
    assert {k: stored[k] for k in COUNTED} == {k: clean.summary[k] for k in COUNTED}

    executions = conn.execute(
        "SELECT attempt, dag_run_id, status, completed_at IS NOT NULL, users_processed, metrics"
        " FROM overnight_job_run_executions WHERE job_run_id = %s ORDER BY attempt", (job.id,)).fetchall()
    assert [e[:5] for e in executions] == [
        (1, "retried-run-1", "partial", True, 0),
        (2, "retried-run-2", "partial", True, 0),
        (3, "retried-run-3", "completed", True, len(served) - 3 * CHUNK)]
    assert [e[5]["batches_failed"] for e in executions] == [1, 1, 0]
    # the job run's timings are its executions' summed
    for key in writing.TIMINGS[1:]:
        assert stored[key] == pytest.approx(sum(e[5][key] for e in executions), abs=0.2)
