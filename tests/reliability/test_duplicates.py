"""Duplicate triggers for the same session: two at once (threads), and two in a row (dag.test()).

One DAG run's worth of results: one job-run row, four events per user, nothing doubled.
"""

from __future__ import annotations

import threading

import psycopg

from overnight.dev import cli
from tests.support import reliability as R
from tests.support.pipeline_run import run_pipeline


def _whole_run(dsn: str, market: str, session, name: str, barrier: threading.Barrier, out: dict) -> None:
    try:
        with psycopg.connect(dsn) as conn:
            barrier.wait(30)
            run = run_pipeline(conn, market, session, name, batch_size=25)
            out[name] = (run.job, run.summary, run.results)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        out[name] = exc


def test_two_triggers_at_once_share_one_job_run(pg_dsn, seeded) -> None:
    market, session = "XNYS", R.S_DUP_THREADS
    out: dict = {}
    barrier = threading.Barrier(3)
    threads = [threading.Thread(target=_whole_run, args=(pg_dsn, market, session, n, barrier, out))
               for n in ("run-a", "run-b", "run-c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    errors = {k: v for k, v in out.items() if isinstance(v, BaseException)}
    assert not errors, errors
    jobs = {v[0].id for v in out.values()}
    corr = {v[0].correlation_id for v in out.values()}
    assert len(jobs) == 1 and len(corr) == 1  # the advisory lock: one row for the session
    with psycopg.connect(pg_dsn) as conn:
        res = R.check_invariants(conn, market, session)
        expected = R.served(conn, market, session)
    assert res.status == "completed" and res.completed == expected
    # Between them the three runs wrote each user once.
    assert sum(r["completed"] for v in out.values() for r in v[2]) == len(expected)


def test_two_dag_runs_in_a_row_for_the_same_session(pg_dsn, seeded, airflow_db) -> None:
    market, session = "BVMF", R.S_DUP_DAGTEST
    first = cli.run_market(market, session, quiet=True, batch_size=200)
    with psycopg.connect(pg_dsn) as conn:
        one = R.check_invariants(conn, market, session)
    second = cli.run_market(market, session, quiet=True, batch_size=50)  # another batch size, same users
    with psycopg.connect(pg_dsn) as conn:
        two = R.check_invariants(conn, market, session)
        expected = R.served(conn, market, session)
    assert first["status"] == second["status"] == "completed"
    assert (two.job_id, two.correlation_id) == (one.job_id, one.correlation_id)
    assert two.completed == one.completed == expected
    assert two.dag_run_id != one.dag_run_id
