"""# Overnight cache warmer

Re-fills the recommendations cache in Redis from Postgres: `recs:{userId}` and `portfolio:{userId}`
from the `recommendations` table, TTL 24 h, for **everyone** or for the **users** you list.

Use it after Redis lost its data (restart, flush, failover) or to refresh some users' keys; the
dashboard falls back to Postgres meanwhile. Rows stream through a server-side cursor and are written
in pipelined chunks. The task returns the counts (users warmed, requested users without recommendations).

**Trigger**: `airflow dags trigger overnight_cache_warmer` (everyone) or
`airflow dags trigger overnight_cache_warmer --conf '{"user_ids": ["<uuid>", ...]}'`.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from airflow.sdk import Param, dag, get_current_context, task  # noqa: E402


@dag(
    dag_id="overnight_cache_warmer",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    description="Re-warm the Redis recommendations cache from Postgres",
    tags=["overnight", "cache"],
    default_args={
        "owner": "overnight",
        "retries": 2,
        "retry_delay": timedelta(seconds=20),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    },
    params={
        "user_ids": Param(
            None, type=["null", "array"], items={"type": "string"}, title="Only these users",
            description="User ids (UUIDs) whose cache keys to re-warm. Empty: everyone with recommendations.",
        ),
    },
)
def overnight_cache_warmer() -> None:
    @task(execution_timeout=timedelta(hours=1))
    def warm_cache() -> dict[str, Any]:
        """Writes recs:{id} and portfolio:{id} from the recommendations table; returns the counts."""
        from overnight import cache_warmer

        return cache_warmer.run(get_current_context()["params"].get("user_ids"))

    warm_cache()


overnight_cache_warmer()
