"""Airflow's metadata clean-up as docs/deploy.md deploys it: no DAG (tasks hold no metadata-database
credentials), but `airflow db clean` and a `find` on the task logs, from cron on a VM
(deploy/vm/overnight-db-clean.cron) and from the official chart's database clean-up CronJob on Kubernetes
(deploy/helm/values-*.yaml).

The cron file's own lines run here, as cron would run them (its `\\%` made `%`, the environment file this
run's), on this run's Airflow metadata database with old DAG runs, task instances, XComs, `log` rows and task
log files; then the database and the log folder are read back. The Helm values must name the same tables,
retention and flags.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.support.airflow_dags import sync_dags_folder

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CRON = ROOT / "deploy" / "vm" / "overnight-db-clean.cron"
DAG_ID = "overnight_scoring_xnys"


def _jobs() -> list[str]:
    """The cron file's commands (after the five time fields and the user), as cron hands them to the shell."""
    lines = [line for line in CRON.read_text().splitlines() if re.match(r"^[0-9*]", line)]
    return [line.split(None, 6)[6].replace("\\%", "%") for line in lines]


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


def test_the_cron_lines_delete_what_is_older_than_90_days_and_keep_the_rest(airflow_db: None,
                                                                            tmp_path: Path) -> None:
    from airflow.sdk.configuration import conf

    now = datetime.now(UTC)
    sync_dags_folder()
    _make_run("cleanup-test-200d", now - timedelta(days=200))
    _make_run("cleanup-test-120d", now - timedelta(days=120))
    _make_run("cleanup-test-5d", now - timedelta(days=5))
    logs = Path(conf.get("logging", "base_log_folder"))
    assert logs == Path(os.environ["AIRFLOW_HOME"]) / "logs"  # what the cron line cleans
    old_file, new_file = _log_files(logs, now)
    assert _counts()["runs"] == ["cleanup-test-120d", "cleanup-test-200d", "cleanup-test-5d"]

    env_file = tmp_path / "airflow.env"  # the services' environment file, as /etc/airflow/airflow.env
    env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in os.environ.items()
                                if k.startswith("AIRFLOW")))
    syslog = tmp_path / "syslog"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "logger").write_text(f"#!/bin/sh\necho \"$*\" >> {syslog}\ncat >> {syslog}\n")
    (bin_dir / "logger").chmod(0o755)
    jobs = _jobs()
    assert len(jobs) == 2 and "airflow db clean" in jobs[0] and "find " in jobs[1]
    for job in jobs:
        proc = subprocess.run(["bash", "-c", job.replace("/etc/airflow/airflow.env", str(env_file))],
                              env={"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
                                   "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    said = syslog.read_text() if syslog.exists() else ""
    assert "failed" not in said, said
    assert _counts() == {
        "runs": ["cleanup-test-5d"], "task_instances": ["cleanup-test-5d"], "xcoms": ["cleanup-test-5d"],
        "logs": ["overnight-test cleanup-test-5d"],
    }
    assert not old_file.exists() and not old_file.parent.exists()
    assert new_file.read_text() == "log line\n"


@pytest.mark.parametrize("values", ["values-celery.yaml", "values-kubernetes.yaml"])
def test_the_helm_values_clean_the_same_tables_with_the_same_flags(values: str) -> None:
    cleanup = yaml.safe_load((ROOT / "deploy" / "helm" / values).read_text())["databaseCleanup"]
    cron = _jobs()[0]
    tables = re.search(r"--tables (\S+)", cron).group(1).split(",")
    assert cleanup["enabled"] is True
    assert cleanup["tables"] == tables and "dag" not in tables and "dag_version" not in tables
    assert (cleanup["retentionDays"], cleanup["batchSize"]) == (90, 5000)
    assert "-90 days" in cron and "--batch-size 5000" in cron
    script = cleanup["args"][-1]
    for flag in ("--skip-archive", "--yes", "--error-on-cleanup-failure", "{{ .Values.databaseCleanup.retentionDays }}",
                 '{{ .Values.databaseCleanup.tables | join "," }}', "{{ .Values.databaseCleanup.batchSize }}"):
        assert flag in script, flag
    assert all(flag in cron for flag in ("--skip-archive", "--yes", "--error-on-cleanup-failure"))
