"""`overnight_metadata_cleanup` on a metadata database with old rows: what is older than the retention goes.

Old DAG runs (with their task instances and XComs), old `log` rows and old task log files are made in
this run's Airflow metadata database and AIRFLOW_HOME; the DAG runs with dag.test(); then the database
and the log folder are read back. A dry run first deletes nothing.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from overnight.ops import metadata_cleanup as mc
from tests.support.airflow_dags import sync_dags_folder

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "overnight_scoring_xnys"


_sync_dags_folder = sync_dags_folder


def _make_run(run_id: str, when: datetime) -> None:
    """A finished scheduled run of the XNYS DAG started at `when`, its task instances, an XCom and a log row."""
    from airflow.models.log import Log
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from sqlalchemy import text

    with create_session() as session:
        dag = SerializedDagModel.get_dag(DAG_ID, session=session)
        dag.create_dagrun(run_id=run_id, logical_date=when, data_interval=(when, when + timedelta(hours=2)),
                          run_after=when, run_type=DagRunType.SCHEDULED,
                          triggered_by=DagRunTriggeredByType.TIMETABLE, state=DagRunState.SUCCESS,
                          start_date=when, session=session)
        session.flush()
        session.execute(text("UPDATE task_instance SET start_date = :w, end_date = :w, state = 'success'"
                             " WHERE dag_id = :d AND run_id = :r"), {"w": when, "d": DAG_ID, "r": run_id})
        session.flush()
        XComModel.set(key="return_value", value={"users": 1}, dag_id=DAG_ID, task_id="start", run_id=run_id,
                      session=session)
        session.execute(text("UPDATE xcom SET timestamp = :w WHERE dag_id = :d AND run_id = :r"),
                        {"w": when, "d": DAG_ID, "r": run_id})
        session.add(Log(event=f"overnight-test {run_id}", extra="test row"))
        session.flush()
        session.execute(text("UPDATE log SET dttm = :w WHERE event = :e"), {"w": when, "e": f"overnight-test {run_id}"})


def _counts() -> dict[str, object]:
    from airflow.utils.session import create_session
    from sqlalchemy import text

    with create_session() as session:
        def rows(sql: str) -> list:
            return sorted(r[0] for r in session.execute(text(sql), {"d": DAG_ID}))

        return {
            "runs": rows("SELECT run_id FROM dag_run WHERE dag_id = :d AND run_id LIKE 'cleanup-test-%'"),
            "task_instances": rows("SELECT DISTINCT run_id FROM task_instance WHERE dag_id = :d"
                                   " AND run_id LIKE 'cleanup-test-%'"),
            "xcoms": rows("SELECT run_id FROM xcom WHERE dag_id = :d AND run_id LIKE 'cleanup-test-%'"),
            "logs": rows("SELECT event FROM log WHERE event LIKE 'overnight-test %'"),
        }


def _log_files(folder: Path, now: datetime) -> tuple[Path, Path]:
    old = folder / "dag_id=overnight_scoring_xnys" / "run_id=cleanup-test-old" / "task_id=start" / "attempt=1.log"
    new = folder / "dag_id=overnight_scoring_xnys" / "run_id=cleanup-test-new" / "task_id=start" / "attempt=1.log"
    for path, age in ((old, 200), (new, 3)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("log line\n")
        stamp = (now - timedelta(days=age)).timestamp()
        os.utime(path, (stamp, stamp))
    return old, new


def _cleanup_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "metadata_cleanup.py"))
    assert bag.import_errors == {}
    return bag.dags["overnight_metadata_cleanup"]


@pytest.mark.usefixtures("airflow_db")
def test_cleanup_deletes_what_is_older_than_the_retention_and_keeps_the_rest():
    from airflow.sdk.configuration import conf

    now = datetime.now(UTC)
    _sync_dags_folder()
    _make_run("cleanup-test-200d", now - timedelta(days=200))
    _make_run("cleanup-test-120d", now - timedelta(days=120))
    _make_run("cleanup-test-5d", now - timedelta(days=5))
    old_file, new_file = _log_files(Path(conf.get("logging", "base_log_folder")), now)
    everything = {
        "runs": ["cleanup-test-120d", "cleanup-test-200d", "cleanup-test-5d"],
        "task_instances": ["cleanup-test-120d", "cleanup-test-200d", "cleanup-test-5d"],
        "xcoms": ["cleanup-test-120d", "cleanup-test-200d", "cleanup-test-5d"],
        "logs": ["overnight-test cleanup-test-120d", "overnight-test cleanup-test-200d",
                 "overnight-test cleanup-test-5d"],
    }
    assert _counts() == everything

    dry = _cleanup_dag().test(run_conf={"retention_days": 90, "dry_run": True})
    assert str(dry.state).endswith("success")
    assert _counts() == everything and old_file.exists() and new_file.exists()

    run = _cleanup_dag().test(run_conf={"retention_days": 90})
    assert str(run.state).endswith("success")
    assert _counts() == {
        "runs": ["cleanup-test-5d"], "task_instances": ["cleanup-test-5d"], "xcoms": ["cleanup-test-5d"],
        "logs": ["overnight-test cleanup-test-5d"],
    }
    assert not old_file.exists() and not old_file.parent.exists()
    assert new_file.read_text() == "log line\n"


def test_defaults_and_limits():
    now = datetime(2026, 6, 1, tzinfo=UTC)
    assert mc.cutoff(now, 90) == datetime(2026, 3, 3, tzinfo=UTC)
    with pytest.raises(mc.CleanupError, match="retention_days 6: must be from 7 to 3650"):
        mc.cutoff(now, 6)
    assert mc.check_tables(None) == list(mc.DEFAULT_TABLES)
    assert "dag" not in mc.DEFAULT_TABLES and "dag_version" not in mc.DEFAULT_TABLES
    assert mc.check_tables(["xcom", "dag_run"]) == ["dag_run", "xcom"]
    with pytest.raises(mc.CleanupError, match=r"tables \['dag'\]: choose among"):
        mc.check_tables(["xcom", "dag"])
    cmd = mc.db_clean_command(datetime(2026, 3, 3, tzinfo=UTC), ["dag_run", "xcom"], dry_run=False)
    assert cmd[1:] == ["-m", "airflow", "db", "clean", "--clean-before-timestamp", "2026-03-03T00:00:00+00:00",
                       "--tables", "dag_run,xcom", "--batch-size", "5000", "--skip-archive", "--yes",
                       "--error-on-cleanup-failure"]


def test_the_database_comes_from_the_connection_when_airflow_hides_its_own(monkeypatch):
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow-db-not-allowed:///")
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_AIRFLOW_METADATA", raising=False)
    monkeypatch.setattr(mc, "get_connection", _missing)
    with pytest.raises(mc.CleanupError, match="set the connection 'overnight_airflow_metadata'"):
        mc.metadata_sqlalchemy_url()
    monkeypatch.undo()
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow-db-not-allowed:///")
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_AIRFLOW_METADATA", "postgresql://af:pw@db.example:5433/airflow")
    assert mc.metadata_sqlalchemy_url() == "postgresql+psycopg2://af:pw@db.example:5433/airflow"


def _missing(conn_id: str):
    raise mc.ConnectionNotConfigured(f"connection '{conn_id}' is not defined")
