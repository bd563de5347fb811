"""Alerts on market runs: a DAG failure callback and a deadline 15 minutes before the session opens.

Both log one structured error line and append an alert to the job run's `overnight_job_runs.alerts`
(`[{"kind", "at", "message", ...}]`) when the job run can be found: by the `start` task's XCom, else by
the market and the Airflow run id, else by the market and the run's session.

The deadline is an Airflow 3 `DeadlineAlert` on the DAG: reference = the run's logical date (for a
scheduled run, its data interval start = open - lead), interval = lead - 15 min, so the deadline is
the session open - 15 min. The callback is an `AsyncCallback` run by the triggerer (present in every
Airflow 3 deployment, whatever the executor), imported by path: `overnight.night.alerts.deadline_missed`.
The scheduler drops the deadline when the run ends in time, so the callback only fires on a miss.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from overnight.adapters import db
from overnight.domain import sessions
from overnight.domain.markets import DAG_ID_PREFIX, Market, format_lead

log = logging.getLogger(__name__)

DEADLINE_BEFORE_OPEN = timedelta(minutes=15)
DEADLINE_CALLBACK = "overnight.night.alerts.deadline_missed"
KIND_DAG_FAILED = "dag_failed"
KIND_DEADLINE_MISSED = "deadline_missed"
MAX_MESSAGE = 2000
_EARLY_TOLERANCE = timedelta(minutes=1)


# --------------------------------------------------------------------------- shared


def market_of(dag_id: str | None) -> str | None:
    """The market code of a market DAG id ('overnight_scoring_xnys' -> 'XNYS'); None for other DAGs."""
    if not dag_id or not dag_id.startswith(DAG_ID_PREFIX) or len(dag_id) == len(DAG_ID_PREFIX):
        return None
    return dag_id[len(DAG_ID_PREFIX):].upper()


def _get(obj: Any, name: str) -> Any:
    """Reads `name` from a mapping or an object (Airflow hands both shapes to callbacks)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _as_datetime(value: Any) -> datetime | None:
    """An aware UTC datetime from a datetime or an ISO string (None when neither)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def run_session(market: str, conf: dict[str, Any] | None, data_interval_end: Any) -> date | None:
    """The session a market run works on: `session_date` from its conf, else the session opening at its interval end."""
    raw = (conf or {}).get("session_date")
    if isinstance(raw, str) and raw:
        try:
            return date.fromisoformat(raw.strip())
        except ValueError:
            return None
    end = _as_datetime(data_interval_end)
    if end is None:
        return None
    try:
        return sessions.session_for_run(market, timedelta(0), end)
    except ValueError:
        return None


def find_job_run(
    conn: psycopg.Connection, market: str, *, job_id: str | None = None, dag_run_id: str | None = None,
    session_date: date | None = None,
) -> str | None:
    """The id of the run's job run: the given id if it exists, else by Airflow run id, else the session's latest."""
    if job_id:
        row = conn.execute("SELECT id FROM overnight_job_runs WHERE id::text = %s", (str(job_id),)).fetchone()
        if row:
            return str(row[0])
    if dag_run_id:
        row = conn.execute(
            "SELECT id FROM overnight_job_runs WHERE market = %s AND dag_run_id = %s ORDER BY started_at DESC LIMIT 1",
            (market, dag_run_id),
        ).fetchone()
        if row:
            return str(row[0])
    if session_date is not None:
        row = conn.execute(
            "SELECT id FROM overnight_job_runs WHERE market = %s AND session_date = %s ORDER BY started_at DESC"
            " LIMIT 1",
            (market, session_date),
        ).fetchone()
        if row:
            return str(row[0])
    return None


def record_alert(conn: psycopg.Connection, job_id: str, kind: str, message: str, *, at: datetime | None = None,
                 **fields: Any) -> dict[str, Any]:
    """Appends an alert {"kind", "at", "message", ...fields} to the job run's `alerts` and commits; returns it."""
    alert = {"kind": kind, "at": (at or datetime.now(UTC)).isoformat(), "message": message[:MAX_MESSAGE],
             **{k: v for k, v in fields.items() if v is not None}}
    conn.execute(
        "UPDATE overnight_job_runs SET alerts = coalesce(alerts, '[]'::jsonb) || jsonb_build_array(%s::jsonb)"
        " WHERE id = %s",
        (json.dumps(alert, default=str), job_id),
    )
    conn.commit()
    return alert


# --------------------------------------------------------------------------- DAG failure callback


def _failed_tasks(dag_id: str, run_id: str | None, context: Mapping[str, Any]) -> list[str]:
    """The run's failed and upstream-failed tasks (the context's task instance asks the Task SDK: its public
    `get_task_states`), else the task in the context."""
    ti = context.get("ti")
    get_states = getattr(ti, "get_task_states", None)
    if run_id and get_states is not None:
        try:
            states = get_states(dag_id=dag_id, run_ids=[run_id]).get(run_id) or {}
            failed = sorted(t for t, s in states.items() if str(s) in ("failed", "upstream_failed"))
            if failed:
                return failed
        except Exception as exc:  # noqa: BLE001 - a richer message is optional; the callback must go on
            log.debug("task states not available in the failure callback: %s", exc)
    task_id = _get(ti, "task_id")
    return [str(task_id)] if task_id else []


def _start_job_id(context: Mapping[str, Any]) -> str | None:
    """The job id the run's `start` task returned ({"job": {"id": ...}}), if the context can read XComs."""
    ti = context.get("ti")
    if ti is None or not hasattr(ti, "xcom_pull"):
        return None
    try:
        started = ti.xcom_pull(task_ids="start")
    except Exception as exc:  # noqa: BLE001 - the XCom is one of three ways to the job run
        log.debug("start XCom not available in the failure callback: %s", exc)
        return None
    job = started.get("job") if isinstance(started, dict) else None
    job_id = job.get("id") if isinstance(job, dict) else None
    return str(job_id) if job_id else None


def handle_dag_failure(context: Mapping[str, Any], dsn: str | None = None) -> dict[str, Any]:
    """Logs the failure and, for a market run, records it on its job run; returns what it found and did."""
    dag_run = context.get("dag_run")
    dag_id = str(_get(context.get("dag"), "dag_id") or _get(dag_run, "dag_id") or "?")
    run_id = context.get("run_id") or _get(dag_run, "run_id")
    reason = str(context.get("reason") or "")
    failed = _failed_tasks(dag_id, run_id, context)
    market = market_of(dag_id)
    out: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "failed_tasks": failed, "market": market,
                           "job_run_id": None, "recorded": False}
    session = None
    if market is not None:
        session = run_session(market, _get(dag_run, "conf"), _get(dag_run, "data_interval_end"))
    out["session_date"] = session.isoformat() if session else None
    log.error(
        "overnight DAG run failed: dag_id=%s run_id=%s market=%s session=%s failed_tasks=%s reason=%s",
        dag_id, run_id, market or "-", out["session_date"] or "-", ",".join(failed) or "-", reason or "-",
        extra={"dag_id": dag_id, "run_id": run_id, "failed_tasks": failed, "market": market},
    )
    if market is None:
        return out
    job_hint = _start_job_id(context)
    with db.connect(dsn) as conn:
        job_id = find_job_run(conn, market, job_id=job_hint, dag_run_id=run_id, session_date=session)
        out["job_run_id"] = job_id
        if job_id is None:
            log.warning("no job run found for %s run %s (session %s): the failure is only logged", dag_id, run_id,
                        out["session_date"] or "unknown")
            return out
        message = (f"{dag_id} run {run_id} failed" + (f" in {', '.join(failed)}" if failed else "")
                   + (f" ({reason})" if reason else ""))
        record_alert(conn, job_id, KIND_DAG_FAILED, message, dag_run_id=run_id, failed_tasks=failed)
    out["recorded"] = True
    return out


def on_dag_failure(context: Mapping[str, Any]) -> None:
    """DAG-level on_failure_callback: logs one structured line, records the alert on the job run; never raises."""
    try:
        handle_dag_failure(context)
    except Exception:  # noqa: BLE001 - a failing callback must not hide the run's own failure
        log.exception("on_dag_failure could not record the alert (dag run %s)", context.get("run_id"))


# --------------------------------------------------------------------------- deadline


def market_deadline(market: Market) -> Any:
    """The DeadlineAlert 'run not finished 15 min before the open' of a market (None if its lead is 15 min or less)."""
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference  # type: ignore[attr-defined]

    interval = market.lead - DEADLINE_BEFORE_OPEN
    if interval <= timedelta(0):
        return None  # the run starts after the deadline: an alert would fire on every run
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=interval,
        callback=AsyncCallback(DEADLINE_CALLBACK, kwargs={"market": market.code}),
        name=f"{market.code} run not finished {format_lead(DEADLINE_BEFORE_OPEN)} before the open",
    )


def handle_deadline_missed(market: str, context: dict[str, Any], *, now: datetime | None = None,
                           dsn: str | None = None) -> dict[str, Any]:
    """Logs the missed deadline and records it on the job run; returns what it found and did."""
    now = now or datetime.now(UTC)
    dag_run = context.get("dag_run") or {}
    deadline = _as_datetime(_get(context.get("deadline"), "deadline_time"))
    dag_id = _get(dag_run, "dag_id") or f"{DAG_ID_PREFIX}{market.lower()}"
    run_id = _get(dag_run, "dag_run_id") or _get(dag_run, "run_id")
    state = _get(dag_run, "state")
    session = run_session(market, _get(dag_run, "conf"), _get(dag_run, "data_interval_end"))
    opens = None
    if session is not None:
        try:
            opens = sessions.session_open_utc(market, session)
        except ValueError:
            opens = None
    out: dict[str, Any] = {"market": market, "dag_id": dag_id, "run_id": run_id,
                           "session_date": session.isoformat() if session else None,
                           "deadline": deadline.isoformat() if deadline else None, "job_run_id": None,
                           "recorded": False}
    if opens is not None and now < opens - DEADLINE_BEFORE_OPEN - _EARLY_TOLERANCE:
        # A manual run's logical date is its trigger time: its deadline can come long before its session's.
        log.info("deadline of %s run %s reached at %s, before its session's (%s open - 15 min): not an alert",
                 dag_id, run_id, now.isoformat(), opens.isoformat())
        out["skipped"] = "before the session's deadline"
        return out
    opens_text = f"{opens:%Y-%m-%d %H:%M} UTC" if opens else "unknown"
    message = (f"{dag_id} run {run_id} for the {market} {out['session_date'] or '?'} session had not finished "
               f"{format_lead(DEADLINE_BEFORE_OPEN)} before the open ({opens_text}); run state {state or 'unknown'}")
    log.error("overnight deadline missed: %s", message,
              extra={"dag_id": dag_id, "run_id": run_id, "market": market, "session_date": out["session_date"]})
    with db.connect(dsn) as conn:
        job_id = find_job_run(conn, market, dag_run_id=run_id, session_date=session)
        out["job_run_id"] = job_id
        if job_id is None:
            log.warning("no job run found for %s run %s: the missed deadline is only logged", dag_id, run_id)
            return out
        record_alert(conn, job_id, KIND_DEADLINE_MISSED, message, at=now, dag_run_id=run_id,
                     deadline=out["deadline"], session_open=opens.isoformat() if opens else None)
    out["recorded"] = True
    return out


async def deadline_missed(market: str, context: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Deadline callback (triggerer): logs and records the miss on the job run; never raises."""
    try:
        return await asyncio.to_thread(handle_deadline_missed, market, context or {})
    except Exception as exc:  # noqa: BLE001 - the log line is the alert of last resort
        log.exception("deadline_missed could not record the alert for %s", market)
        return {"market": market, "recorded": False, "error": str(exc)[:500]}
