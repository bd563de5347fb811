"""Alert helpers without a database: market of a DAG id, the run's session, the deadline object."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from overnight.domain.markets import Market
from overnight.night import alerts

pytestmark = pytest.mark.filterwarnings("ignore:Series.values returning an ndarray")


@pytest.mark.parametrize(
    ("dag_id", "market"),
    [
        pytest.param("overnight_scoring_xnys", "XNYS", id="market"),
        pytest.param("overnight_scoring_", None, id="prefix-only"),
        pytest.param("overnight_preflight", None, id="ops-dag"),
        pytest.param(None, None, id="none"),
    ],
)
def test_market_of(dag_id: str | None, market: str | None) -> None:
    assert alerts.market_of(dag_id) == market


@pytest.mark.parametrize(
    ("conf", "end", "session"),
    [
        pytest.param({"session_date": "2026-10-05"}, None, date(2026, 10, 5), id="conf-wins"),
        pytest.param({}, datetime(2026, 11, 24, 14, 30, tzinfo=UTC), date(2026, 11, 24), id="interval-end"),
        pytest.param(None, "2026-11-24T14:30:00Z", date(2026, 11, 24), id="interval-end-json"),
        pytest.param({"session_date": "24/11/2026"}, None, None, id="bad-conf"),
        pytest.param(None, None, None, id="nothing"),
    ],
)
def test_run_session(conf: dict | None, end: object, session: date | None) -> None:
    assert alerts.run_session("XNYS", conf, end) == session


def test_market_deadline_is_open_minus_15_minutes() -> None:
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    deadline = alerts.market_deadline(Market("XNYS"))
    assert isinstance(deadline, DeadlineAlert)
    assert deadline.reference == DeadlineReference.DAGRUN_LOGICAL_DATE
    assert deadline.interval == timedelta(hours=1, minutes=45)  # logical date = open - 2h
    assert isinstance(deadline.callback, AsyncCallback)
    assert deadline.callback.path == "overnight.night.alerts.deadline_missed"
    assert deadline.callback.kwargs == {"market": "XNYS"}
    assert alerts.market_deadline(Market("XLON", lead=timedelta(minutes=15))) is None


def test_deadline_survives_dag_serialisation() -> None:
    from airflow.sdk import DAG, task
    from airflow.serialization.decoders import decode_deadline_alert
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("alerts_roundtrip", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=UTC),
             deadline=alerts.market_deadline(Market("XLON", lead=timedelta(minutes=90))),
             on_failure_callback=alerts.on_dag_failure) as dag:
        @task
        def noop() -> None:
            return None

        noop()
    data = DagSerialization.to_dict(dag)
    back = DagSerialization.from_dict(data)
    assert back.has_on_failure_callback
    (encoded,) = back.deadline
    decoded = decode_deadline_alert(encoded)
    assert decoded.interval == timedelta(minutes=75)
    assert decoded.reference.reference_name == "DagRunLogicalDateDeadline"
    assert decoded.callback.path == "overnight.night.alerts.deadline_missed"
    assert decoded.callback.kwargs == {"market": "XLON"}


@pytest.mark.parametrize(
    "context",
    [
        pytest.param({}, id="empty"),
        pytest.param({"dag": object(), "run_id": None, "dag_run": 42}, id="odd-shapes"),
    ],
)
def test_on_dag_failure_of_an_unknown_run_logs_one_error_line(context: dict, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="overnight.night.alerts")
    assert alerts.on_dag_failure(context) is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "overnight.night.alerts"] == [
        ("ERROR", "overnight DAG run failed: dag_id=? run_id=None market=- session=- failed_tasks=- reason=-")]


def test_on_dag_failure_logs_when_the_alert_cannot_be_recorded(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", "postgresql://x:y@127.0.0.1:1/none")
    caplog.set_level("INFO", logger="overnight.night.alerts")
    assert alerts.on_dag_failure({"dag": SimpleNamespace(dag_id="overnight_scoring_xnys"), "run_id": "r1",
                                  "reason": "boom"}) is None
    records = [r for r in caplog.records if r.name == "overnight.night.alerts"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("ERROR", "overnight DAG run failed: dag_id=overnight_scoring_xnys run_id=r1 market=XNYS session=- "
                  "failed_tasks=- reason=boom"),
        ("ERROR", "on_dag_failure could not record the alert (dag run r1)"),
    ]
    assert "127.0.0.1" in str(records[1].exc_info[1]) and "port 1" in str(records[1].exc_info[1])


def test_deadline_callback_accepts_the_triggerer_call() -> None:
    import inspect

    from airflow._shared.module_loading import accepts_context, import_string

    fn = import_string(alerts.DEADLINE_CALLBACK)
    assert inspect.iscoroutinefunction(fn) and accepts_context(fn)
