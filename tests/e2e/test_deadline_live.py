"""The market DAGs under a live scheduler and triggerer: the DeadlineAlert, the asset events, one DAG version, and
the DAG failure callback.

A run whose deadline (logical date + lead - 15 min) passes while its batches are held back by a lock
gets exactly one `deadline_missed` alert on its job run, recorded by the callback the triggerer runs;
once the lock goes, the run completes. A run that finishes before its deadline records none. A run that fails
(its one user's data is broken, so `finalize` fails it) gets exactly one `dag_failed` alert naming that task, recorded
by the DAG's on_failure_callback as the real components run it. Each run
updates `overnight://recommendations/<market>`, and the cache warmer, scheduled on it
(`OVERNIGHT_CACHE_WARMER_AFTER=<market>`), runs on those events and finds the cache already warm.

The scheduler runs with its timetables on (asset-triggered runs need them), so the test uses a market
whose own scheduled run is not due while it runs (`quiet_market`): at 06:10 UTC that is not XLON, whose
run for today's session would start the moment its DAG is unpaused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from overnight.domain import sessions
from overnight.domain.markets import Market
from overnight.night import alerts
from tests.support import reliability as R
from tests.support.live_airflow import LiveAirflow, live_airflow, quiet_market
from tests.support.ports import is_loopback

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
LATE_SESSION = date(2026, 11, 16)  # past sessions: their own deadlines (open - 15 min) have passed
IN_TIME_SESSION = date(2026, 11, 17)
FAILED_SESSION = date(2026, 11, 18)
MARGIN = timedelta(seconds=30)
WARMER = "overnight_cache_warmer"


def _alerts(dsn: str, market: Market, session: date) -> list[dict] | None:
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT alerts FROM overnight_job_runs WHERE market = %s AND session_date = %s",
                        (market.code, session)).fetchone()
    return None if row is None else (row[0] or [])


def _job(dsn: str, market: Market, session: date) -> tuple:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT status, users_processed, users_failed FROM overnight_job_runs"
                         " WHERE market = %s AND session_date = %s", (market.code, session)).fetchone()


@pytest.fixture(scope="module")
def stack(airflow_db, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Market, str, LiveAirflow]]:
    """One live stack for the module's tests (started once: it takes most of a minute), on a database of 400 users."""
    market = quiet_market()
    for session in (LATE_SESSION, IN_TIME_SESSION, FAILED_SESSION):
        assert sessions.is_session(market.code, session), session
    tmp_path: Path = tmp_path_factory.mktemp("live")
    with R.scratch_database("deadline", users=400) as dsn, \
            live_airflow(tmp_path, dsn, tag="deadline", scheduled=True,
                         OVERNIGHT_CACHE_WARMER_AFTER=market.code) as af:
        R.wait_until(lambda: af.dag_parsed(market.dag_id) and af.dag_parsed(WARMER), 180, 1,
                     "the dag-processor to parse the DAGs")
        yield market, dsn, af


def test_deadline_alert_fires_for_a_late_run_and_not_for_one_in_time(stack):
    market, dsn, af = stack
    DAG_ID = market.dag_id  # noqa: N806 - a constant of this test
    interval = market.lead - alerts.DEADLINE_BEFORE_OPEN
    af.unpause(WARMER)
    with psycopg.connect(dsn, autocommit=True) as c:
        served = len(R.served(c, market.code, LATE_SESSION))
    assert served > 0

    # A slow batch: hold the recommendations table until the deadline has fired.
    lock = psycopg.connect(dsn)
    lock.execute("LOCK TABLE recommendations IN ACCESS EXCLUSIVE MODE")
    try:
        deadline = (datetime.now(UTC) + MARGIN).replace(microsecond=0)
        logical = (deadline - interval).isoformat()
        af.trigger(DAG_ID, "deadline_late", {"session_date": LATE_SESSION.isoformat(), "batch_size": 100},
                   logical_date=logical)
        R.wait_until(lambda: _alerts(dsn, market, LATE_SESSION) is not None, 180, 1, "the late run's job-run row")
        assert _alerts(dsn, market, LATE_SESSION) == []  # started, before its deadline
        try:
            fired = R.wait_until(lambda: _alerts(dsn, market, LATE_SESSION) or None, 240, 1, "the deadline_missed alert")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{af.log_tail('triggerer')}\n{af.log_tail('scheduler')}") from None
        assert datetime.now(UTC) >= deadline
        assert af.run_state(DAG_ID, "deadline_late") == "running"
    finally:
        lock.rollback()
        lock.close()
    assert af.wait_finished(DAG_ID, "deadline_late") == "success", af.log_tail("scheduler")
    (alert,) = fired
    assert alert["kind"] == "deadline_missed" and alert["dag_run_id"] == "deadline_late"
    assert datetime.fromisoformat(alert["deadline"]) == datetime.fromisoformat(logical) + interval
    assert f"{DAG_ID} run deadline_late for the {market.code} {LATE_SESSION} session had not finished 15m before" \
        in alert["message"]
    assert _alerts(dsn, market, LATE_SESSION) == [alert]  # once, and the run's success adds none
    assert _job(dsn, market, LATE_SESSION) == ("completed", served, 0)

    in_time = datetime.now(UTC).isoformat()  # deadline 1h45m away
    af.trigger(DAG_ID, "deadline_in_time", {"session_date": IN_TIME_SESSION.isoformat(), "batch_size": 100},
               logical_date=in_time)
    assert af.wait_finished(DAG_ID, "deadline_in_time") == "success", af.log_tail("scheduler")
    with psycopg.connect(dsn, autocommit=True) as c:
        served_in_time = len(R.served(c, market.code, IN_TIME_SESSION))
    assert _job(dsn, market, IN_TIME_SESSION) == ("completed", served_in_time, 0)
    assert _alerts(dsn, market, IN_TIME_SESSION) == []
    # The scheduler and the triggerer run without their log servers (which would listen on every
    # interface): the task logs are still there, read by the api-server from the files (the UI's source).
    log = af.task_log(DAG_ID, "deadline_in_time", "start")
    assert f"for {market.code} session {IN_TIME_SESSION.isoformat()}" in log, log[-2000:]
    wide = sorted(entry for entry in af.listeners() if not is_loopback(entry[0]))
    assert not wide, f"the stack listens beyond loopback: {wide}"
    # The dag-processor re-parsed the DAG every 5 s across both runs: still one DAG version.
    with psycopg.connect(af.af_dsn) as c:
        assert c.execute("SELECT count(*) FROM dag_version WHERE dag_id = %s", (DAG_ID,)).fetchone()[0] == 1
        events = c.execute(
            "SELECT e.source_run_id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
            " WHERE a.uri = %s ORDER BY e.id", (f"overnight://recommendations/{market.code}",)).fetchall()
    assert [(run_id, extra["session_date"], extra["status"], extra["cache_status"]) for run_id, extra in events] == [
        ("deadline_late", LATE_SESSION.isoformat(), "completed", "warmed"),
        ("deadline_in_time", IN_TIME_SESSION.isoformat(), "completed", "warmed")]

    def warmer_results() -> list[dict] | None:
        with psycopg.connect(af.af_dsn) as c:
            busy = c.execute("SELECT count(*) FROM dag_run WHERE dag_id = %s AND state NOT IN ('success', 'failed')",
                             (WARMER,)).fetchone()[0]
            rows = c.execute("SELECT r.run_type, r.state, x.value FROM dag_run r LEFT JOIN xcom x ON"
                             " x.dag_run_id = r.id AND x.task_id = 'warm_cache' AND x.key = 'return_value'"
                             " WHERE r.dag_id = %s ORDER BY r.id", (WARMER,)).fetchall()
        results = [json.loads(v) if isinstance(v, str) else v for _, _, v in rows]
        if busy or sum((r or {}).get("events", 0) for r in results) < len(events):
            return None
        assert {(t, st) for t, st, _ in rows} == {("asset_triggered", "success")}, rows
        return results

    results = R.wait_until(warmer_results, 180, 1, "the cache warmer's asset-triggered runs")
    reason = "the triggering market runs warmed the cache themselves"
    assert all(r == {"skipped": True, "reason": reason, "events": r["events"]} for r in results), results
    assert sum(r["events"] for r in results) == 2


def test_a_failed_run_records_one_dag_failed_alert_naming_the_failed_task(stack):
    market, dsn, af = stack
    with psycopg.connect(dsn) as c:  # the run's one user: its holdings lose their quantities, so it fails
        (user,) = sorted(R.served(c, market.code, FAILED_SESSION))[:1]
        c.execute("UPDATE holdings SET quantity = NULL WHERE user_id = %s", (user,))
    af.trigger(market.dag_id, "failed_run", {"session_date": FAILED_SESSION.isoformat(), "user_ids": [user]})
    assert af.wait_finished(market.dag_id, "failed_run") == "failed", af.log_tail("scheduler")
    with psycopg.connect(af.af_dsn) as c:
        states = dict(c.execute("SELECT task_id, state FROM task_instance WHERE dag_id = %s AND run_id = 'failed_run'",
                                (market.dag_id,)).fetchall())
    # every user failed: finalize writes the job run failed and fails the run; the tasks before it succeeded
    assert states == {"start": "success", "fetch_rates": "success", "plan_batches": "success",
                      "score_batch": "success", "finalize": "failed"}
    assert _job(dsn, market, FAILED_SESSION) == ("failed", 0, 1)
    try:  # the DAG's on_failure_callback, run by the dag-processor once the scheduler has failed the run
        fired = R.wait_until(lambda: _alerts(dsn, market, FAILED_SESSION) or None, 120, 1, "the dag_failed alert")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{af.log_tail('dag-processor')}\n{af.log_tail('scheduler')}") from None
    time.sleep(10)  # two dag-processor refreshes: a second callback would have recorded a second alert by now
    (alert,) = _alerts(dsn, market, FAILED_SESSION)
    assert alert == fired[0]
    assert (alert["kind"], alert["dag_run_id"], alert["failed_tasks"]) == ("dag_failed", "failed_run", ["finalize"])
    assert alert["message"] == f"{market.dag_id} run failed_run failed in finalize (task_failure)"  # Airflow's reason
