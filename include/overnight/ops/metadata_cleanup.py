"""Keeps Airflow's own metadata database bounded: `airflow db clean` for old rows, and old task log files.

The package creates hundreds of task instances a day (mapped batches x markets), each with XComs,
log-table rows and rendered fields; nothing deletes them by itself. `airflow db clean` deletes rows
older than a cutoff table by table, keeping each DAG's latest scheduled run (the scheduler needs it).

A task cannot reach the metadata database through Airflow's own settings (Airflow 3 blocks it in task
processes), so the command gets the database from the connection `overnight_airflow_metadata`
(`AIRFLOW_CONN_OVERNIGHT_AIRFLOW_METADATA=postgresql://...`), else from the process's
`AIRFLOW__DATABASE__SQL_ALCHEMY_CONN` when it is usable (in-process runs: `dag.test()`, `make run`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from overnight.adapters.connections import ConnectionNotConfigured, get_connection, postgres_dsn

log = logging.getLogger(__name__)

METADATA_CONN_ID = "overnight_airflow_metadata"
DEFAULT_RETENTION_DAYS = 90
MIN_RETENTION_DAYS = 7
MAX_RETENTION_DAYS = 3650
# The tables that grow with every run. Not `dag` (it would drop DAGs' rows), nor `dag_version`
# (history of the code), nor tables this package does not use.
DEFAULT_TABLES = ("dag_run", "task_instance", "task_instance_history", "task_reschedule", "xcom", "log", "job",
                  "asset_event", "deadline", "callback", "trigger")
ALLOWED_TABLES = (*DEFAULT_TABLES, "dag_version", "import_error", "_xcom_archive")
BATCH_SIZE = 5000
_BLOCKED = "airflow-db-not-allowed"
_OUTPUT_TAIL = 4000


class CleanupError(RuntimeError):
    """The clean-up could not run or failed; the message says what and what to do."""


def cutoff(now: datetime, retention_days: int) -> datetime:
    """The moment before which rows and log files are deleted; rejects a retention outside 7 days-10 years."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not MIN_RETENTION_DAYS <= retention_days <= MAX_RETENTION_DAYS:
        raise CleanupError(f"retention_days {retention_days}: must be from {MIN_RETENTION_DAYS} to "
                           f"{MAX_RETENTION_DAYS} (recent runs are what the UI, retries and alerts use)")
    return now - timedelta(days=retention_days)


def check_tables(tables: Sequence[str] | None) -> list[str]:
    """The tables to clean, in a stable order: the default set for None; rejects unknown or risky names."""
    if tables is None:
        return list(DEFAULT_TABLES)
    bad = sorted(set(tables) - set(ALLOWED_TABLES))
    if bad or not tables:
        raise CleanupError(f"tables {bad or '[]'}: choose among {', '.join(ALLOWED_TABLES)}")
    return [t for t in ALLOWED_TABLES if t in set(tables)]


def metadata_sqlalchemy_url() -> str:
    """The metadata database's SQLAlchemy URL for the `airflow db clean` subprocess."""
    try:
        info = get_connection(METADATA_CONN_ID)
    except ConnectionNotConfigured:
        info = None
    if info is not None:
        return postgres_dsn(info).replace("postgresql://", "postgresql+psycopg2://", 1)
    current = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if current and _BLOCKED not in current:
        return current
    raise CleanupError(
        f"no metadata database for `airflow db clean`: Airflow hides its own from tasks; set the connection "
        f"'{METADATA_CONN_ID}' (AIRFLOW_CONN_{METADATA_CONN_ID.upper()}=postgresql://user:pass@host:5432/airflow) "
        "to a role allowed to delete from the metadata tables"
    )


def db_clean_command(before: datetime, tables: Sequence[str], *, dry_run: bool) -> list[str]:
    """The `airflow db clean` command line: no archive tables (they would grow instead), no prompt."""
    cmd = [sys.executable, "-m", "airflow", "db", "clean", "--clean-before-timestamp", before.isoformat(),
           "--tables", ",".join(tables), "--batch-size", str(BATCH_SIZE), "--skip-archive", "--yes",
           "--error-on-cleanup-failure"]
    return [*cmd, "--dry-run"] if dry_run else cmd


def run_db_clean(before: datetime, tables: Sequence[str], *, dry_run: bool, timeout: float = 3000) -> dict[str, Any]:
    """Runs `airflow db clean` in a subprocess against the metadata database; raises CleanupError on failure."""
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_sqlalchemy_url()}
    env.pop("AIRFLOW__CORE__SQL_ALCHEMY_CONN", None)
    t0 = time.perf_counter()
    proc = subprocess.run(db_clean_command(before, tables, dry_run=dry_run), env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    output = (proc.stdout + proc.stderr)[-_OUTPUT_TAIL:]
    for line in output.splitlines():
        log.info("airflow db clean: %s", line)
    if proc.returncode != 0:
        raise CleanupError(f"airflow db clean exited {proc.returncode}; its output ends:\n{output}")
    return {"cutoff": before.isoformat(), "tables": list(tables), "dry_run": dry_run,
            "duration_s": round(time.perf_counter() - t0, 1)}


def delete_old_log_files(folder: Path, before: datetime, *, dry_run: bool) -> dict[str, Any]:
    """Deletes task log files under `folder` last written before `before`, then the empty folders left."""
    limit = before.timestamp()
    files = deleted_bytes = 0
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < limit:
                files += 1
                deleted_bytes += path.stat().st_size
                if not dry_run:
                    path.unlink()
        if not dry_run:
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                if not any(sub.iterdir()):
                    sub.rmdir()
    log.info("task log files older than %s under %s: %d (%d bytes)%s", before.isoformat(), folder, files,
             deleted_bytes, " (dry run: kept)" if dry_run else " deleted")
    return {"folder": str(folder), "files": files, "bytes": deleted_bytes, "dry_run": dry_run}
