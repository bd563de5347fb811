"""Whole DAG runs with dag.test(): the job-run row, counts, partial runs, re-runs, Redis down, bad params."""

from __future__ import annotations

import logging
from datetime import date

import psycopg
import pytest

from overnight.adapters.pseudonyms import user_ref
from overnight.dev import cli, seed
from overnight.domain import sessions
from tests.support.pipeline_run import make_latest

pytestmark = pytest.mark.e2e


def _served(conn, market: str, session: date) -> set[str]:
    return {str(u) for u, m in conn.execute("SELECT id, markets FROM users WHERE active")
            if sessions.serving_market(m, session) == market}


def _job(conn, market, session):
    return conn.execute(
        "SELECT id, status, users_processed, users_failed, correlation_id, error_details, metrics, dag_run_id"
        " FROM overnight_job_runs WHERE market = %s AND session_date = %s ORDER BY started_at DESC LIMIT 1",
        (market, session)).fetchone()


def _events(conn, corr) -> int:
    return conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s", (corr,)).fetchone()[0]


def test_run_counts_match_the_served_users_and_rerun_adds_nothing(pg_dsn, seeded, airflow_db, redis_client):
    session = date(2026, 11, 23)  # a Monday: every market trades
    with psycopg.connect(pg_dsn) as conn:
        make_latest(conn, session)  # its documents are the ones to cache
    result = cli.run_market("XLON", session, quiet=True)
    with psycopg.connect(pg_dsn) as conn:
        expected = _served(conn, "XLON", session)
        job = _job(conn, "XLON", session)
        assert result["dag_run_state"].endswith("success")
        assert job[1] == "completed" and job[2] == len(expected) > 0 and job[3] == 0
        assert _events(conn, job[4]) == 4 * len(expected)
        assert job[6]["cache_status"] == "warmed" and job[6]["users_total"] == len(expected)
        first_run_id = job[7]
        some_user = sorted(expected)[0]
    assert redis_client.exists(f"recs:{some_user}") == 1

    again = cli.run_market("XLON", session, quiet=True)  # dag.test() makes a new DAG run
    with psycopg.connect(pg_dsn) as conn:
        job2 = _job(conn, "XLON", session)
        assert (job2[0], job2[4]) == (job[0], job[4])  # same row, same correlation id
        assert job2[7] != first_run_id  # the latest DAG run that worked on it
        assert _events(conn, job[4]) == 4 * len(expected)
        assert conn.execute("SELECT count(*) FROM overnight_job_runs WHERE market = 'XLON' AND session_date = %s",
                            (session,)).fetchone()[0] == 1
    assert again["status"] == "completed"


def test_a_corrupted_user_makes_the_run_partial_and_is_named(pg_dsn, seeded, airflow_db, capfd, caplog):
    """The failed user is named by id in the job run's row (Postgres: holders of personal data) and by pseudonym
    only in the run's task logs, which every viewer of Airflow reads (docs/access.md). The victim is the first
    user served, so also its batch's first user: the boundary the batch plan carries."""
    session = date(2026, 11, 24)
    with psycopg.connect(pg_dsn) as conn:
        served = sorted(_served(conn, "XNYS", session))
        victim = served[0]
        conn.execute("UPDATE holdings SET quantity = -1 WHERE user_id = %s", (victim,))
        conn.commit()
    capfd.readouterr()
    caplog.set_level(logging.INFO)
    try:
        cli.run_market("XNYS", session)  # not quiet: every task log line Airflow writes
        # wherever Airflow's logging sends them in this process (fds 1 and 2, or the log records)
        logs = "".join(capfd.readouterr()) + "\n".join(r.getMessage() for r in caplog.records)
        with psycopg.connect(pg_dsn) as conn:
            job = _job(conn, "XNYS", session)
    finally:
        with psycopg.connect(pg_dsn) as conn:
            seed.seed(conn, 600, 7, dsn=pg_dsn)
    assert job[1] == "partial"
    assert (job[2], job[3]) == (len(served) - 1, 1)
    assert job[5]["users"] == [{"userId": victim, "stage": "load", "message": job[5]["users"][0]["message"]}]
    assert "quantity" in job[5]["users"][0]["message"]
    assert f"user {user_ref(victim)} failed at load" in logs, logs[-3000:]
    leaked = [line[:300] for line in logs.splitlines() if any(uid in line for uid in served)]
    assert not leaked, f"user ids in the task logs: {leaked[:5]}"


def test_redis_unreachable_still_completes_in_postgres(pg_dsn, seeded, airflow_db, monkeypatch):
    session = date(2026, 11, 25)
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_REDIS", "redis://127.0.0.1:1/0")
    cli.run_market("BVMF", session, quiet=True)
    with psycopg.connect(pg_dsn) as conn:
        job = _job(conn, "BVMF", session)
        expected = _served(conn, "BVMF", session)
        in_pg = conn.execute("SELECT count(*) FROM recommendation_history WHERE job_run_id = %s", (job[0],)).fetchone()[0]
    assert job[1] == "completed" and job[2] == len(expected) == in_pg > 0
    assert job[6]["cache_status"] == "not warmed"


BAD = "overnight_scoring_xnys: bad parameters: "


@pytest.mark.parametrize(
    ("conf", "refused"),
    [
        pytest.param({"session_date": "2026-11-26"},  # Thanksgiving 2026 (a Thursday): NYSE closed
                     ("start", BAD + "session_date: 2026-11-26 is not a XNYS session (weekend or exchange holiday);"
                      " nearest sessions: 2026-11-25 before, 2026-11-27 after; pass one of those"), id="holiday"),
        pytest.param({"session_date": "26/11/2026"},
                     ("schema", "Invalid input for param session_date: '26/11/2026' is not a 'date'"),
                     id="malformed-date"),
        pytest.param({"session_date": "2026-11-30", "batch_sise": 5},
                     ("start", BAD + "unknown --conf keys ['batch_sise']; known: ['session_date', 'user_ids',"
                      " 'batch_size', 'contribution', 'force', 'recalculate']"), id="unknown-key"),
        pytest.param({"session_date": "2026-11-30", "user_ids": ["'; DROP TABLE users;--"]},
                     ("start", BAD + """user_ids: not UUIDs: ["'; DROP TABLE users;--"]"""), id="hostile-user-id"),
    ],
)
def test_bad_parameters_fail_before_anything_is_written(pg_dsn, seeded, airflow_db, monkeypatch, conf, refused):
    from overnight.dev.cli import _load_dag
    from tests.support.airflow_dags import refusal

    dag = _load_dag("overnight_scoring_xnys")
    with psycopg.connect(pg_dsn) as conn:
        before = conn.execute("SELECT count(*) FROM overnight_job_runs").fetchone()[0]
    assert refusal(dag, conf, monkeypatch) == refused
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM overnight_job_runs").fetchone()[0] == before
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 600


def test_params_validation_messages():
    from overnight.domain.markets import get_market
    from overnight.night import runtime

    with pytest.raises(runtime.ParamError, match="not a XNYS session"):
        runtime.validate_params(get_market("XNYS"), {}, {"session_date": "2026-11-26"}, interval_end=None,
                                run_after=None)
    with pytest.raises(runtime.ParamError, match="batch_size: expected an integer from 1"):
        runtime.validate_params(get_market("XNYS"), {}, {"batch_size": 0}, interval_end=None, run_after=None)


def test_a_run_does_not_leak_its_conf_into_the_next(pg_dsn, seeded, airflow_db):
    """dag.test() merges a run's conf into the DAG object's params; each in-process run gets a fresh DAG."""
    from overnight.dev.cli import _load_dag

    bad = _load_dag("overnight_scoring_xnys").test(run_conf={"session_date": "2026-12-07", "user_ids": ["nope"]})
    assert str(bad.state).endswith("failed")
    result = cli.run_market("XNYS", date(2026, 12, 7), quiet=True)
    assert result["status"] == "completed" and result["processed"] > 0
