"""# Airflow metadata clean-up

Keeps **Airflow's own metadata database** bounded. Every night the market DAGs create hundreds of task
instances (mapped batches x markets) with their XComs, log-table rows and rendered fields; Airflow
deletes none of it by itself, and the grid, the scheduler's queries and backups slow down as it grows.

Every day at 03:30 UTC (after `overnight_audit_retention`, before the first market run):

1. `clean_metadata`: `airflow db clean --clean-before-timestamp <now - retention_days> --skip-archive`
   on the tables below. It deletes only rows older than the cutoff, table by table, and keeps each DAG's
   latest scheduled run (the scheduler needs it to compute the next one). `--skip-archive`: no
   `_airflow_deleted__*` copies, which would grow instead.
2. `clean_task_log_files`: deletes task log files under Airflow's `base_log_folder` last written before
   the same cutoff (and the empty folders left), when `clean_log_files` is on.

**Defaults (safe)**: keep **90 days** (at least 7 can be set, so retries, clears, alerts and the grid
always have the recent runs); tables `dag_run`, `task_instance`, `task_instance_history`,
`task_reschedule`, `xcom`, `log`, `job`, `asset_event`, `deadline`, `callback`, `trigger`. Never `dag`
(DAG rows) nor, unless chosen, `dag_version`. Set `dry_run` to see what would go (the counts are in the
task log). The application's own audit trail is in the application database and has its own retention
(`overnight_audit_retention`), untouched here.

**Database access**: Airflow 3 hides its database from tasks, so the command reads it from the connection
`overnight_airflow_metadata` (e.g. `AIRFLOW_CONN_OVERNIGHT_AIRFLOW_METADATA=postgresql://user:pass@host/airflow`,
a role allowed to delete from these tables; `make airflow` sets it). In-process runs (`dag.test()`) use
Airflow's own setting.

**Trigger**: `airflow dags trigger overnight_metadata_cleanup --conf '{"retention_days": 30, "dry_run": true}'`
or the trigger form (parameters explained there).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from airflow.sdk import Param, dag, get_current_context, task  # noqa: E402

from overnight.ops import metadata_cleanup as mc  # noqa: E402


def _cutoff(params: dict[str, Any]) -> datetime:
    """The cutoff of this run: its logical date (else now) minus `retention_days`."""
    ctx = get_current_context()
    moment = ctx.get("logical_date") or datetime.now(UTC)
    return mc.cutoff(moment, int(params["retention_days"]))


@dag(
    dag_id="overnight_metadata_cleanup",
    schedule="30 3 * * *",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    description="Deletes Airflow metadata (runs, task instances, XComs, logs) older than the retention (default 90 days)",
    tags=["operations"],
    default_args={
        "owner": "overnight",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
    },
    params={
        "retention_days": Param(
            mc.DEFAULT_RETENTION_DAYS, type="integer", minimum=mc.MIN_RETENTION_DAYS, maximum=mc.MAX_RETENTION_DAYS,
            title="Keep (days)",
            description="Rows and task log files older than this many days before the run are deleted.",
        ),
        "tables": Param(
            list(mc.DEFAULT_TABLES), type="array", items={"type": "string", "enum": list(mc.ALLOWED_TABLES)},
            minItems=1, title="Tables", description="Metadata tables given to `airflow db clean`.",
        ),
        "clean_log_files": Param(
            True, type="boolean", title="Delete old task log files",
            description="Also delete task log files under Airflow's base_log_folder older than the cutoff.",
        ),
        "dry_run": Param(
            False, type="boolean", title="Dry run",
            description="Only report what would be deleted (see the task logs); delete nothing.",
        ),
    },
)
def overnight_metadata_cleanup() -> None:
    @task(multiple_outputs=False, execution_timeout=timedelta(hours=1))
    def clean_metadata() -> dict[str, Any]:
        """Runs `airflow db clean` on the chosen tables for rows older than the cutoff; returns what it did."""
        params = get_current_context()["params"]
        tables = mc.check_tables(params.get("tables"))
        return mc.run_db_clean(_cutoff(params), tables, dry_run=bool(params.get("dry_run")))

    @task(multiple_outputs=False, execution_timeout=timedelta(hours=1))
    def clean_task_log_files() -> dict[str, Any]:
        """Deletes task log files older than the cutoff under Airflow's base_log_folder; returns the counts."""
        from airflow.sdk.configuration import conf

        params = get_current_context()["params"]
        folder = Path(conf.get("logging", "base_log_folder"))
        if not params.get("clean_log_files"):
            return {"folder": str(folder), "files": 0, "bytes": 0, "skipped": True}
        return mc.delete_old_log_files(folder, _cutoff(params), dry_run=bool(params.get("dry_run")))

    clean_metadata() >> clean_task_log_files()


overnight_metadata_cleanup()
