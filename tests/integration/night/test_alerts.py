"""Alert callbacks against the real database: the job-run row gets the alert; Airflow creates the deadline."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from overnight.domain import sessions
from overnight.night import alerts

pytestmark = pytest.mark.filterwarnings("ignore:Series.values returning an ndarray")

SESSION = date(2026, 10, 5)  # a Monday no other test uses
DAG_ID = "overnight_scoring_xnys"


def _job_run(conn: psycopg.Connection, session: date, dag_run_id: str, status: str = "started") -> str:
    job_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO overnight_job_runs (id, job_type, status, started_at, correlation_id, market, session_date,"
        " dag_run_id) VALUES (%s, 'scoring', %s, now(), %s, 'XNYS', %s, %s)",
        (job_id, status, uuid.uuid4(), session, dag_run_id),
    )
    conn.commit()
    return str(job_id)


def _alerts(conn: psycopg.Connection, job_id: str) -> list[dict[str, Any]]:
    return conn.execute("SELECT alerts FROM overnight_job_runs WHERE id = %s", (job_id,)).fetchone()[0]


class _Ti:
    """The part of a RuntimeTaskInstance the failure callback uses."""

    def __init__(self, task_id: str, started: Any) -> None:
        self.task_id = task_id
        self._started = started

    def xcom_pull(self, task_ids: str) -> Any:
        assert task_ids == "start"
        return self._started


def test_dag_failure_with_full_context_records_on_the_start_job(pg_dsn: str) -> None:
    run_id = f"manual__{uuid.uuid4().hex}"
    with psycopg.connect(pg_dsn) as conn:
        job_id = _job_run(conn, SESSION, "some-other-run")  # found through the start XCom, not the run id
        dag_run = SimpleNamespace(dag_id=DAG_ID, run_id=run_id, conf={"session_date": SESSION.isoformat()},
                                  data_interval_end=None)
        context = {"dag": SimpleNamespace(dag_id=DAG_ID), "dag_run": dag_run, "run_id": run_id,
                   "reason": "task_failure", "ti": _Ti("score_batch", {"job": {"id": job_id}})}
        alerts.on_dag_failure(context)
        out = alerts.handle_dag_failure(context)  # twice: two alerts, appended
        (first, second) = _alerts(conn, job_id)
    assert out["job_run_id"] == job_id and out["recorded"] and out["failed_tasks"] == ["score_batch"]
    assert first["kind"] == "dag_failed" and first["dag_run_id"] == run_id
    assert first["message"] == f"{DAG_ID} run {run_id} failed in score_batch (task_failure)"
    assert datetime.fromisoformat(first["at"]).tzinfo is not None
    assert second["kind"] == "dag_failed"


def test_dag_failure_with_minimal_context_finds_the_job_by_run_id(pg_dsn: str) -> None:
    run_id = f"session__{uuid.uuid4().hex}"
    with psycopg.connect(pg_dsn) as conn:
        job_id = _job_run(conn, date(2026, 10, 6), run_id)
        alerts.on_dag_failure({"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": run_id, "reason": "timed_out"})
        (alert,) = _alerts(conn, job_id)
    assert alert["kind"] == "dag_failed" and "timed_out" in alert["message"]


def test_dag_failure_by_session_from_the_data_interval(pg_dsn: str) -> None:
    session = date(2026, 10, 7)
    opens = sessions.session_open_utc("XNYS", session)
    with psycopg.connect(pg_dsn) as conn:
        job_id = _job_run(conn, session, "older-run")
        dag_run = SimpleNamespace(dag_id=DAG_ID, run_id="session__2026-10-07-retrigger", conf={},
                                  data_interval_end=opens)
        out = alerts.handle_dag_failure({"dag": SimpleNamespace(dag_id=DAG_ID), "dag_run": dag_run,
                                         "run_id": dag_run.run_id, "reason": "task_failure"})
        assert out["session_date"] == session.isoformat() and out["job_run_id"] == job_id
        assert len(_alerts(conn, job_id)) == 1


def test_dag_failure_without_a_job_run_or_of_another_dag_only_logs(pg_dsn: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = alerts.handle_dag_failure({"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": "nope", "reason": "x"})
    assert out["job_run_id"] is None and not out["recorded"]
    out = alerts.handle_dag_failure({"dag": SimpleNamespace(dag_id="overnight_preflight"), "run_id": "r"})
    assert out["market"] is None and not out["recorded"]
    assert any("overnight DAG run failed: dag_id=overnight_preflight run_id=r" in r.getMessage()
               for r in caplog.records)


def _deadline_context(run_id: str, session: date, state: str = "running") -> dict[str, Any]:
    """What the scheduler hands the callback: DAGRunResponse as JSON plus the deadline."""
    opens = sessions.session_open_utc("XNYS", session)
    return {
        "dag_run": {"dag_run_id": run_id, "dag_id": DAG_ID, "logical_date": (opens - timedelta(hours=2)).isoformat(),
                    "data_interval_start": (opens - timedelta(hours=2)).isoformat(),
                    "data_interval_end": opens.isoformat(), "state": state, "conf": {}, "run_type": "scheduled"},
        "deadline": {"id": str(uuid.uuid4()), "deadline_time": opens - timedelta(minutes=15)},
    }


def test_deadline_missed_records_on_the_job_run(pg_dsn: str) -> None:
    session = date(2026, 10, 8)
    run_id = f"session__{session}"
    with psycopg.connect(pg_dsn) as conn:
        job_id = _job_run(conn, session, run_id)
        out = asyncio.run(alerts.deadline_missed(market="XNYS", context=_deadline_context(run_id, session)))
        (alert,) = _alerts(conn, job_id)
    opens = sessions.session_open_utc("XNYS", session)
    assert out["recorded"] and out["job_run_id"] == job_id
    assert alert["kind"] == "deadline_missed" and alert["dag_run_id"] == run_id
    assert alert["session_open"] == opens.isoformat()
    assert alert["deadline"] == (opens - timedelta(minutes=15)).isoformat()
    assert f"the XNYS {session} session had not finished 15m before the open (2026-10-08 13:30 UTC)" in alert["message"]


def test_deadline_of_a_manual_run_before_its_session_deadline_is_not_an_alert(pg_dsn: str) -> None:
    session = date(2026, 10, 9)
    run_id = f"manual__{uuid.uuid4().hex}"
    opens = sessions.session_open_utc("XNYS", session)
    with psycopg.connect(pg_dsn) as conn:
        job_id = _job_run(conn, session, run_id)
        out = alerts.handle_deadline_missed("XNYS", _deadline_context(run_id, session), now=opens - timedelta(hours=3))
        assert out["skipped"] and not out["recorded"] and _alerts(conn, job_id) == []


def test_deadline_callback_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", "postgresql://x:y@127.0.0.1:1/none")
    out = asyncio.run(alerts.deadline_missed(market="XNYS", context=_deadline_context("r", SESSION)))
    assert out == {"market": "XNYS", "recorded": False, "error": out["error"]}
    assert out["error"].startswith('connection failed: connection to server at "127.0.0.1", port 1 failed')
