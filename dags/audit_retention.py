"""# Audit retention

Keeps the audit trail and the job history to **two years** (`OVERNIGHT_RETENTION_DAYS`, default 730),
every day at 03:00 UTC:

- `calculation_events`: monthly partitions wholly older than the cutoff are **dropped** (no row scan);
  the partition straddling the cutoff and the DEFAULT partition lose only their rows older than the cutoff.
  A row at or after the cutoff is never touched.
- `overnight_job_runs` started before the cutoff, with their `overnight_job_users` rows.
- Creates this month's and the next three months' event partitions, so that inserts never land in the
  DEFAULT partition.

Safe to re-run or to trigger by hand at any time (a second run finds nothing to do). The task returns
the counts (cutoff, partitions dropped, rows deleted, job runs deleted) and logs them. Drops and deletes
wait at most 10 s for a lock held by a running scoring batch, then fail and retry.

**Trigger**: `airflow dags trigger overnight_audit_retention`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import dag, task


@dag(
    dag_id="overnight_audit_retention",
    schedule="0 3 * * *",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    description="Drops audit partitions and job runs older than the retention (default 2 years)",
    tags=["operations", "audit"],
    default_args={
        "owner": "overnight",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
    },
)
def overnight_audit_retention() -> None:
    @task(multiple_outputs=False, execution_timeout=timedelta(hours=2))
    def apply_retention() -> dict[str, Any]:
        """Drops and deletes what is older than the cutoff, creates the upcoming partitions; returns the counts."""
        from overnight.adapters import db
        from overnight.ops import retention

        with db.connect() as conn:
            return retention.run(conn)

    apply_retention()


overnight_audit_retention()
