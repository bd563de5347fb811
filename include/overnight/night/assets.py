"""The Airflow assets the package publishes: `overnight://recommendations/<MARKET>`, one per market.

Each market DAG's `finalize` task names its market's asset as an outlet and, when the run ends
`completed` or `partial`, Airflow records an asset event whose extra is `event_extra(...)`. Other DAGs
schedule on it with `schedule=[Asset("overnight://recommendations/XNYS")]` (or `|` several markets) and
read the extra from `triggering_asset_events`. A run that fails records no event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from airflow.sdk import Asset

URI_PREFIX = "overnight://recommendations/"
EXTRA_KEYS = ("market", "session_date", "status", "users_processed", "users_failed", "users_total",
              "recommendations_generated", "cache_status", "correlation_id", "job_run_id", "dag_run_id")


def recommendations_uri(code: str) -> str:
    """The asset URI of a market's recommendations, e.g. 'overnight://recommendations/XNYS'."""
    return f"{URI_PREFIX}{code.upper()}"


def recommendations_asset(code: str) -> Asset:
    """The asset updated when a market's run has written its users' recommendations (name = URI)."""
    return Asset(recommendations_uri(code))


def event_extra(market: str, job: dict[str, Any], summary: dict[str, Any], dag_run_id: str) -> dict[str, Any]:
    """The asset event's extra: which session, its outcome and counts, and how to find the job run (JSON-able)."""
    return {
        "market": market,
        "session_date": str(job["session_date"]),
        "status": summary["status"],
        "users_processed": int(summary["users_processed"]),
        "users_failed": int(summary["users_failed"]),
        "users_total": int(summary.get("users_total") or 0),
        "recommendations_generated": int(summary.get("recommendations_generated") or 0),
        "cache_status": summary.get("cache_status"),
        "correlation_id": str(job["correlation_id"]),
        "job_run_id": str(job["id"]),
        "dag_run_id": dag_run_id,
    }


def markets_needing_warm_cache(extras: Iterable[dict[str, Any]]) -> list[str]:
    """The markets among these asset events' extras whose run left the cache not (fully) warmed, sorted."""
    return sorted({str(e.get("market")) for e in extras
                   if e.get("cache_status") not in ("warmed", "nothing to warm")})
