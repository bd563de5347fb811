"""Who is calculated, and how often, against the real exchange calendars as the oracle.

Every active user with a market trading that day is calculated exactly once, by the market that opens
first among theirs (CONTRACT.md: "A user is scored once per day"), worked out here from exchange-calendars'
own session opens, not from the package's sessions module. Inactive users never are; `user_ids` limits a
run; a re-run after a partial run completes the user who failed, adding nothing for the others."""

from __future__ import annotations

from datetime import date

import exchange_calendars as xcals
import psycopg
import pytest

from overnight.dev import seed
from overnight.domain.markets import load_markets
from overnight.night import jobrun
from tests.support.pipeline_run import run_pipeline

CODES = load_markets().codes


def _oracle(markets: list[str], day: date) -> str | None:
    """The market that serves a user on `day`: the earliest session open among their markets trading that day."""
    opens = [(xcals.get_calendar(c).session_open(day), c) for c in markets if xcals.get_calendar(c).is_session(day)]
    return min(opens)[1] if opens else None


def _run(conn: psycopg.Connection, market: str, day: date, *, user_ids: tuple[str, ...] | None = None,
         force: bool = True) -> tuple[jobrun.JobRun, dict]:
    run = run_pipeline(conn, market, day, "test-audience", force=force, user_ids=user_ids, batch_size=150)
    return run.job, run.summary


def _completed(conn: psycopg.Connection, job: jobrun.JobRun) -> set[str]:
    return {str(r[0]) for r in conn.execute(
        "SELECT user_id FROM overnight_job_users WHERE job_run_id = %s AND status = 'completed'", (job.id,))}


@pytest.mark.parametrize("day", [
    pytest.param(date(2026, 11, 26), id="us-thanksgiving-xnys-closed"),
    pytest.param(date(2026, 2, 18), id="ash-wednesday-b3-opens-late"),
])
def test_every_served_user_is_calculated_once_by_the_earliest_open_market(pg_dsn, seeded, day: date) -> None:
    with psycopg.connect(pg_dsn) as conn:
        inactive = [str(r[0]) for r in conn.execute("SELECT id FROM users WHERE active ORDER BY id LIMIT 7")]
        conn.execute("UPDATE users SET active = false WHERE id = ANY(%s::uuid[])", (inactive,))
        conn.commit()
        try:
            done: dict[str, set[str]] = {}
            for market in CODES:
                if xcals.get_calendar(market).is_session(day):
                    job, summary = _run(conn, market, day)
                    assert summary["status"] == "completed", (market, summary)
                    done[market] = _completed(conn, job)
            users = [(str(u), list(m), a) for u, m, a in conn.execute("SELECT id, markets, active FROM users")]
        finally:
            conn.rollback()
            seed.seed(conn, 600, 7, dsn=pg_dsn)  # restore the shared data set
    assert "XNYS" not in done if day == date(2026, 11, 26) else "BVMF" in done
    calculated: dict[str, list[str]] = {}
    for market, ids in done.items():
        for uid in ids:
            calculated.setdefault(uid, []).append(market)
    for uid, markets, active in users:
        expected = _oracle(markets, day) if active else None
        assert calculated.get(uid, []) == ([expected] if expected else []), (uid, markets, active)
    assert set(inactive).isdisjoint(calculated)
    assert all(done.values()), "every market trading that day served someone"


def test_user_ids_limit_a_run_to_those_users(pg_dsn, seeded) -> None:
    day = date(2026, 11, 30)
    with psycopg.connect(pg_dsn) as conn:
        served = sorted(u for u, m in conn.execute("SELECT id::text, markets FROM users WHERE active")
                        if _oracle(list(m), day) == "XLON")
        chosen = tuple(served[:3])
        job, summary = _run(conn, "XLON", day, user_ids=chosen)
        assert _completed(conn, job) == set(chosen)
        assert summary["users_total"] == 3 and summary["users_processed"] == 3
        events = conn.execute("SELECT count(*), count(DISTINCT user_id) FROM calculation_events"
                              " WHERE correlation_id = %s", (job.correlation_id,)).fetchone()
    assert events == (12, 3)


def test_a_rerun_after_a_partial_run_completes_the_failed_user_only(pg_dsn, seeded) -> None:
    day = date(2026, 12, 8)
    with psycopg.connect(pg_dsn) as conn:
        served = sorted(u for u, m in conn.execute("SELECT id::text, markets FROM users WHERE active")
                        if _oracle(list(m), day) == "XTKS")
        victim = served[len(served) // 3]
        conn.execute("UPDATE allocation_targets SET min_pct = 60, max_pct = 90 WHERE user_id = %s", (victim,))
        conn.commit()
        try:
            job, first = _run(conn, "XTKS", day)
            assert (first["status"], first["users_failed"]) == ("partial", 1)
            seed.seed(conn, 600, 7, dsn=pg_dsn)  # the user's targets are fixed
            between = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            conn.commit()
            again, second = _run(conn, "XTKS", day, force=False)
            recalculated = conn.execute("SELECT DISTINCT user_id::text FROM calculation_events"
                                        " WHERE correlation_id = %s AND created_at > %s",
                                        (job.correlation_id, between)).fetchall()
            counts = conn.execute("SELECT count(*), count(DISTINCT user_id) FROM calculation_events"
                                  " WHERE correlation_id = %s", (job.correlation_id,)).fetchone()
            status = conn.execute("SELECT status, users_processed, users_failed FROM overnight_job_runs WHERE id = %s",
                                  (job.id,)).fetchone()
        finally:
            conn.rollback()
            seed.seed(conn, 600, 7, dsn=pg_dsn)
    assert again.id == job.id and again.correlation_id == job.correlation_id
    assert status == ("completed", len(served), 0)
    assert recalculated == [(victim,)]  # only the failed user was calculated again
    # four events per user, none twice, and the victim's failed attempt: CALC_STARTED, CALC_FAILED (docs/audit.md)
    assert counts == (4 * len(served) + 2, len(served))
