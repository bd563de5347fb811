"""# Overnight preflight

Checks, every hour and whenever you trigger it, that the night's runs can work. Each problem is one line;
**any problem fails the task** (the lines are the error), warnings are only logged.

| check | problem when |
|---|---|
| `overnight_postgres` | `select 1` fails (the connection is named, its password masked) |
| `overnight_redis` | `PING` fails |
| `overnight_rates_http`, `overnight_prices_http` | configured but a cheap request fails (skipped when not configured) |
| pools | a market's scoring pool (`overnight_scoring`, or the `pool` `markets.yaml` names) is missing: fails naming `airflow pools import pools.json`; needs REST API access (connection `overnight_airflow_api`), else skipped with a warning |
| calendars | exchange_calendars data has ended (warning when it ends within 60 days) |
| market DAGs | a market DAG is missing, paused, or its next run is not where the exchange calendar says (open - lead) |
| `markets.yaml` | an entry is invalid |

**Trigger**: `airflow dags trigger overnight_preflight`. See `docs/operations.md`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)


@dag(
    dag_id="overnight_preflight",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    description="Checks connections, providers, pools, calendars and the market DAGs' schedule",
    tags=["operations"],
    default_args={
        "owner": "overnight",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    },
)
def overnight_preflight() -> None:
    @task(multiple_outputs=False, execution_timeout=timedelta(minutes=5))
    def preflight() -> dict[str, Any]:
        """Runs every check; fails with one line per problem, logs the warnings; returns the report."""
        from overnight.ops import preflight as checks

        report = checks.run_in_task(ti=get_current_context()["ti"])
        for line in report.notes:
            log.info("preflight: %s", line)
        for line in report.warnings:
            log.warning("preflight: %s", line)
        if report.problems:
            raise AirflowFailException(report.failure_message())
        return {"problems": 0, "warnings": report.warnings, "notes": report.notes}

    preflight()


overnight_preflight()
