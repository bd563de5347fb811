"""Audit retention: drops whole monthly partitions past the cutoff, trims the rest, purges old job runs.

The audit trail is monthly partitioned: `calculation_chunks` (a chunk of users' events and documents, on
created_at; migration 0011), and the tables of one row per event and per document written before it,
`calculation_events_rows` (on created_at) and `recommendation_history_rows` (on generated_at); all are retained
alike. The job run's snapshots (quotes, assets, criteria, rates, scores) go with their job run.

The cutoff is `now - OVERNIGHT_RETENTION_DAYS` (default 730 days, two years). A row strictly older than
the cutoff goes; a row at or after it stays. Monthly partitions whose upper bound is at or before the cutoff
are dropped whole (no row scan); the partition straddling the cutoff and the DEFAULT partition lose only
their old rows. Job runs started before the cutoff go with their `overnight_job_users` rows. The next
months' partitions are created first, so inserts never fall into the DEFAULT partition. Idempotent.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 730
RETENTION_ENV = "OVERNIGHT_RETENTION_DAYS"
CHUNK_TABLE = "calculation_chunks"
PARENT_TABLE = "calculation_events_rows"
HISTORY_TABLE = "recommendation_history_rows"
# partitioned table: its partition key
AUDIT_TABLES = {CHUNK_TABLE: "created_at", PARENT_TABLE: "created_at", HISTORY_TABLE: "generated_at"}
UPCOMING_MONTHS = 3
JOB_RUN_BATCH = 200
LOCK_TIMEOUT = "10s"  # DROP/DELETE wait at most this long for a running scoring insert; the task retries
_BOUND = re.compile(r"FROM \((?P<low>[^)]*)\) TO \((?P<high>[^)]*)\)")


@dataclass(frozen=True)
class Partition:
    """One partition of an audit table: its name and range (None bound = MINVALUE/MAXVALUE or DEFAULT)."""

    name: str
    low: datetime | None
    high: datetime | None
    is_default: bool = False


def retention_days(environ: dict[str, str] | None = None) -> int:
    """Returns OVERNIGHT_RETENTION_DAYS (default 730); raises ValueError naming the variable if it is unusable."""
    raw = (environ if environ is not None else os.environ).get(RETENTION_ENV, "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS
    try:
        days = int(raw)
    except ValueError:
        raise ValueError(f"{RETENTION_ENV}={raw!r} is not a whole number of days; e.g. 730 for two years") from None
    if days < 31:
        raise ValueError(f"{RETENTION_ENV}={days} is below 31 days; the audit trail must cover at least a month")
    return days


def cutoff_for(now: datetime, days: int) -> datetime:
    """The retention cutoff: rows created strictly before it are removed."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC) - timedelta(days=days)


def _bound(text: str) -> datetime | None:
    """Parses one rendered partition bound ('2024-01-01 00:00:00+00', MINVALUE or MAXVALUE)."""
    value = text.strip().strip("'")
    if value.upper() in ("MINVALUE", "MAXVALUE"):
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_partition(name: str, bound_expr: str) -> Partition:
    """Builds a Partition from pg_get_expr(relpartbound) text ('FOR VALUES FROM (...) TO (...)' or 'DEFAULT')."""
    if bound_expr.strip().upper() == "DEFAULT":
        return Partition(name, None, None, is_default=True)
    match = _BOUND.search(bound_expr)
    if match is None:
        raise ValueError(f"partition {name}: unexpected bound {bound_expr!r}; expected a RANGE FROM ... TO ...")
    return Partition(name, _bound(match["low"]), _bound(match["high"]))


def plan(partitions: list[Partition], cutoff: datetime) -> tuple[list[Partition], list[Partition]]:
    """Splits partitions into (drop whole: upper bound <= cutoff, trim rows: may hold rows on both sides)."""
    drop: list[Partition] = []
    trim: list[Partition] = []
    for p in sorted(partitions, key=lambda p: (p.is_default, p.low or datetime.min.replace(tzinfo=UTC))):
        if p.is_default:
            trim.append(p)
        elif p.high is not None and p.high <= cutoff:
            drop.append(p)
        elif p.low is None or p.low < cutoff:
            trim.append(p)
    return drop, trim


def list_partitions(conn: psycopg.Connection, parent: str = CHUNK_TABLE) -> list[Partition]:
    """Returns the partitions of `parent` (calculation_chunks by default) as they are in the database."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass ORDER BY c.relname",
        (parent,),
    ).fetchall()
    return [parse_partition(name, expr) for name, expr in rows]


def ensure_upcoming(conn: psycopg.Connection, today: date, months: int = UPCOMING_MONTHS) -> int:
    """Creates this month's and the next `months` months' partitions; returns how many were new."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT ensure_event_partitions(%s, %s)", (today.replace(day=1), months + 1)).fetchone()
    except psycopg.errors.CheckViolation as exc:
        raise RuntimeError(
            f"cannot create the upcoming calculation_chunks partitions: {exc.diag.message_primary}; rows of that "
            "month are in calculation_chunks_default: move them out (INSERT into the new month, DELETE from the "
            "default partition) and re-run"
        ) from exc
    return int(row[0]) if row else 0


def _purge_job_runs(conn: psycopg.Connection, cutoff: datetime) -> tuple[int, int]:
    """Deletes job runs started before the cutoff and their per-user rows, in small batches; returns counts."""
    runs = users = 0
    while True:
        with conn.transaction():
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM overnight_job_runs WHERE started_at < %s ORDER BY started_at LIMIT %s FOR UPDATE",
                (cutoff, JOB_RUN_BATCH),
            )]
            if not ids:
                return runs, users
            users += conn.execute("DELETE FROM overnight_job_users WHERE job_run_id = ANY(%s)", (ids,)).rowcount
            runs += conn.execute("DELETE FROM overnight_job_runs WHERE id = ANY(%s)", (ids,)).rowcount


def run(conn: psycopg.Connection, *, now: datetime | None = None, days: int | None = None) -> dict[str, Any]:
    """Applies the retention policy once; returns what it did (cutoff, partitions dropped, rows deleted)."""
    now = now or datetime.now(UTC)
    days = days if days is not None else retention_days()
    cutoff = cutoff_for(now, days)
    conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    conn.commit()
    created = ensure_upcoming(conn, now.astimezone(UTC).date())
    dropped: list[str] = []
    rows_in_dropped: dict[str, int] = {}
    trimmed: dict[str, dict[str, int]] = {}
    for parent, column in AUDIT_TABLES.items():
        drop, trim = plan(list_partitions(conn, parent), cutoff)
        conn.commit()  # end the read's implicit transaction: each block below then commits on its own
        rows_in_dropped[parent] = 0
        for p in drop:
            with conn.transaction():
                ident = sql.Identifier(p.name)
                count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
                rows_in_dropped[parent] += int(count[0]) if count else 0
                conn.execute(sql.SQL("DROP TABLE {}").format(ident))
            dropped.append(p.name)
            log.info("retention: dropped partition %s (upper bound %s <= cutoff %s)", p.name, p.high, cutoff)
        trimmed[parent] = {}
        for p in trim:
            with conn.transaction():
                n = conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {} < %s").format(sql.Identifier(p.name), sql.Identifier(column)),
                    (cutoff,),
                ).rowcount
            if n:
                trimmed[parent][p.name] = n
    runs, users = _purge_job_runs(conn, cutoff)
    result = {
        "cutoff": cutoff.isoformat(),
        "retention_days": days,
        "partitions_created": created,
        "partitions_dropped": dropped,
        "chunk_rows_in_dropped_partitions": rows_in_dropped[CHUNK_TABLE],
        "chunk_rows_deleted": sum(trimmed[CHUNK_TABLE].values()),
        "chunk_rows_deleted_by_partition": trimmed[CHUNK_TABLE],
        "event_rows_in_dropped_partitions": rows_in_dropped[PARENT_TABLE],
        "event_rows_deleted": sum(trimmed[PARENT_TABLE].values()),
        "event_rows_deleted_by_partition": trimmed[PARENT_TABLE],
        "history_rows_in_dropped_partitions": rows_in_dropped[HISTORY_TABLE],
        "history_rows_deleted": sum(trimmed[HISTORY_TABLE].values()),
        "job_runs_deleted": runs,
        "job_users_deleted": users,
    }
    log.info("retention: cutoff %s, %d partitions dropped (%d rows), %d chunk rows and %d older event rows deleted,"
             " %d job runs and %d job-user rows deleted, %d partitions created", cutoff.isoformat(), len(dropped),
             sum(rows_in_dropped.values()), result["chunk_rows_deleted"], result["event_rows_deleted"], runs, users,
             created)
    return result
