"""# Overnight cache warmer

Re-fills the recommendations cache in Redis from Postgres: `recs:{userId}` and `portfolio:{userId}`
from the `recommendations` table, TTL 24 h, for **everyone** or for the **users** you list.

Use it after Redis lost its data (restart, flush, failover) or to refresh some users' keys; the
dashboard falls back to Postgres meanwhile. Rows stream through a server-side cursor and are written
in pipelined chunks. The task returns the counts (users warmed, requested users without recommendations); each run
is recorded as a `cache-warm` job run in `overnight_job_runs` (no market; its session date is the day it ran).

**Trigger**: `airflow dags trigger overnight_cache_warmer` (everyone) or
`airflow dags trigger overnight_cache_warmer --conf '{"user_ids": ["<uuid>", ...]}'`.

**After the market runs (optional)**: with `OVERNIGHT_CACHE_WARMER_AFTER=all` (or a list of market codes,
`XNYS,BVMF`) in the environment of the dag-processor and scheduler, the DAG is scheduled on the markets'
`overnight://recommendations/<MARKET>` assets: it runs when any of them is updated and, from the
events' extra, warms everyone only when a run left the cache not fully warmed (`cache_status` other than
`warmed`, e.g. Redis was down during the night); otherwise it logs why and does nothing. Unset (the
default): manual only.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import AssetAny, Param, dag, get_current_context, task

from overnight.domain.markets import load_markets
from overnight.night import assets


def _schedule(setting: str) -> AssetAny | None:
    """None (manual only), or any of the listed markets' recommendations assets ('all': every market)."""
    setting = setting.strip()
    if not setting:
        return None
    codes = load_markets(check_codes=False).codes if setting.lower() == "all" else [
        c.strip().upper() for c in setting.split(",") if c.strip()]
    return AssetAny(*(assets.recommendations_asset(c) for c in sorted(set(codes))))


@dag(
    dag_id="overnight_cache_warmer",
    schedule=_schedule(os.environ.get("OVERNIGHT_CACHE_WARMER_AFTER", "")),
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
    # the counts only in the log line: the return value names requested users (by pseudonym)
    @task(multiple_outputs=False, execution_timeout=timedelta(hours=1), show_return_value_in_logs=False)
    def warm_cache() -> dict[str, Any]:
        """Writes recs:{id} and portfolio:{id} from the recommendations table; returns the counts."""
        from overnight.ops import cache_warmer

        ctx = get_current_context()
        extras = [dict(e.extra or {}) for events in ctx["triggering_asset_events"].values() for e in events]
        if extras and not assets.markets_needing_warm_cache(extras):
            reason = "the triggering market runs warmed the cache themselves"
            logging.getLogger(__name__).info("nothing to do: %s (%s)", reason,
                                             ", ".join(sorted({str(e.get("market")) for e in extras})))
            return {"skipped": True, "reason": reason, "events": len(extras)}
        return cache_warmer.run(ctx["params"].get("user_ids"), dag_run_id=ctx["dag_run"].run_id)

    warm_cache()


overnight_cache_warmer()
