"""Postgres restarted (`pg_ctl restart -m fast`) in the middle of a run, on a private server.

The batch that was in flight fails with a connection error (nothing of it is written: a user has its
four events, its `completed` row and its document, or none of them); the batch is retried as Airflow
would (a new task attempt, a new connection) and the run completes with nothing doubled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest

from overnight.adapters import migrate
from overnight.adapters.providers.base import RatesSnapshot
from overnight.adapters.providers.db import DbPriceProvider
from overnight.dev import seed
from overnight.domain.markets import get_market, load_markets
from overnight.night import jobrun, pipeline, runtime
from tests.support import reliability as R

MARKET = "XNYS"


@pytest.fixture(scope="module")
def private_pg() -> Iterator[R.PrivatePostgres]:
    server = R.PrivatePostgres()
    try:
        yield server
    finally:
        server.stop()


class RestartingPrices:
    """The database price provider, which restarts the server while batch number `at` is in flight."""

    def __init__(self, conn: psycopg.Connection, server: R.PrivatePostgres, at: int, log: list[str]) -> None:
        self.inner = DbPriceProvider(conn)
        self.server, self.at, self.log = server, at, log

    def fetch_prices(self, symbols):  # noqa: ANN001, ANN201 - PriceProvider protocol
        quotes = self.inner.fetch_prices(symbols)
        self.log.append("fetch")
        if len(self.log) == self.at:
            self.server.restart()  # between the batch's reads and its write
            self.log.append("restarted")
        return quotes


def _attempt(dsn: str, job: jobrun.JobRun, aud: jobrun.Audience, rates, batch, server, at, calls):
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        batch, aud = runtime.resolve_batch(conn, batch)  # the batch's id range, from overnight_job_batches
        return pipeline.score_batch(conn, job, aud, rates, batch, RestartingPrices(conn, server, at, calls),
                                    warm_cache=None,
                                    contribution=jobrun.Contribution(Decimal("1000"), "USD"))


def test_restart_mid_batch_fails_cleanly_is_retried_and_completes(private_pg: R.PrivatePostgres,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = private_pg.create()
    migrate.migrate(dsn)
    with psycopg.connect(dsn) as c:
        seed.seed(c, 1200, 7, dsn=dsn)
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", dsn)
    market = get_market(MARKET)
    run = runtime.validate_params(market, {}, {"session_date": R.S_PG_RESTART.isoformat(), "batch_size": 40},
                                  interval_end=None, run_after=None)
    job_x = runtime.start(market, run, "reliability-pg-restart")
    rates_x = runtime.fetch_rates(job_x)
    batches = runtime.plan(market, run, load_markets().codes, job_x)
    assert len(batches) >= 4
    job = jobrun.JobRun.from_xcom(job_x)
    rates = RatesSnapshot.from_xcom(rates_x)
    aud = jobrun.Audience.from_xcom(batches[0]["audience"])
    calls: list[str] = []
    results: list[dict | None] = []
    errors: list[str] = []
    for batch in batches:
        for attempt in range(4):  # Airflow: retries=3
            try:
                results.append(_attempt(dsn, job, aud, rates, batch, private_pg, 3, calls))
                break
            except psycopg.OperationalError as exc:
                errors.append(f"batch {batch['index']} attempt {attempt + 1}: {str(exc).strip().splitlines()[0]}")
                with psycopg.connect(dsn) as c:  # the failed attempt left no trace
                    R.check_invariants(c, MARKET, R.S_PG_RESTART, finished=False)
                time.sleep(0.5)
        else:
            results.append(None)
    assert "restarted" in calls and errors, (calls, errors)
    assert errors[0].startswith("batch 2 attempt 1"), errors
    summary = runtime.finalize(job_x, batches, results, rates_x)
    assert summary is not None and summary["status"] == "completed", summary
    with psycopg.connect(dsn) as c:
        out = R.check_invariants(c, MARKET, R.S_PG_RESTART)
        assert out.completed == R.served(c, MARKET, R.S_PG_RESTART)
    # Again, as a re-trigger would: same job run, nothing written twice.
    again = runtime.start(market, run, "reliability-pg-restart-2")
    assert (again["id"], again["correlation_id"]) == (job_x["id"], job_x["correlation_id"])
    res2 = [runtime.score_batch(b, again, rates_x, run.to_xcom()) for b in batches]
    assert sum(r["completed"] for r in res2) == 0
    runtime.finalize(again, batches, res2, rates_x)
    with psycopg.connect(dsn) as c:
        assert R.check_invariants(c, MARKET, R.S_PG_RESTART).completed == out.completed


@pytest.mark.slow
def test_restart_at_a_random_moment_of_a_cli_run(private_pg: R.PrivatePostgres, airflow_db, tmp_path) -> None:
    """`make run` (dag.test in a subprocess) while the application database restarts under it."""
    dsn = private_pg.create()
    migrate.migrate(dsn)
    with psycopg.connect(dsn) as c:
        seed.seed(c, 2000, 7, dsn=dsn)
    env = R.subprocess_env(AIRFLOW_CONN_OVERNIGHT_POSTGRES=dsn)
    proc = R.cli_run("XLON", R.S_PG_RESTART, env, batch_size=30, log=tmp_path / "run.log")
    try:
        def written() -> int:
            try:
                with psycopg.connect(dsn, connect_timeout=2) as c:
                    return c.execute("SELECT count(*) FROM overnight_job_users").fetchone()[0]
            except psycopg.OperationalError:
                return 0

        R.wait_until(lambda: written() > 0 or proc.poll() is not None, 180, 0.05, "a first batch")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        hit = False
        for _ in range(5):  # restart while a task holds a session, until one task is hit
            def busy() -> bool:
                try:
                    with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as c:
                        return bool(c.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'overnight'"
                            " AND state <> 'idle'").fetchone())
                except psycopg.OperationalError:
                    return False

            R.wait_until(lambda: busy() or proc.poll() is not None, 120, 0.01, "a task's database session")
            if proc.poll() is not None:
                break
            private_pg.restart()
            time.sleep(1.5)
            log = (tmp_path / "run.log").read_text(errors="replace")
            if "OperationalError" in log or "terminating connection" in log:
                hit = True
                break
        assert hit, "no task was hit by the restarts"
        rc = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = (tmp_path / "run.log").read_text(errors="replace")
    with psycopg.connect(dsn) as c:
        first = R.check_invariants(c, "XLON", R.S_PG_RESTART)
        expected = R.served(c, "XLON", R.S_PG_RESTART)
    # The restart hit a task (asserted above): its attempt failed and Airflow retried it on a new
    # connection, so the same run finishes completed with every served user once.
    assert rc == 0, log[-3000:]
    assert first.status == "completed" and first.completed == expected
    # Running it again continues the same job run and adds nothing.
    proc2 = R.cli_run("XLON", R.S_PG_RESTART, env, batch_size=30, log=tmp_path / "run2.log")
    assert proc2.wait(600) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    with psycopg.connect(dsn) as c:
        out = R.check_invariants(c, "XLON", R.S_PG_RESTART)
    assert out.correlation_id == first.correlation_id
    assert out.status == "completed" and out.completed == expected
