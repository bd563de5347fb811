"""`make demo` and `make run` as a person sees them: short output, logs in a file, causes on failure.

Runs the real make targets in a sandbox of their own (application and metadata databases, a Redis
database, an Airflow home), so the 1,000 demo users do not touch this run's other tests.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from overnight.adapters.connections import POSTGRES_CONN_ID, from_value, postgres_dsn
from overnight.dev import devenv
from overnight.domain import sessions

ROOT = Path(__file__).resolve().parents[3]
MARKETS = ["BVMF", "XLON", "XNYS", "XTKS"]
PROGRESS = re.compile(r"^(?P<code>[A-Z]{4})\s+\d{4}-\d{2}-\d{2} (?P<done>[\d,]+)/(?P<total>[\d,]+) users\s+[\d,]+ users/s"
                      r"\s+done in \d+\.\d s$")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment of a separate set of databases on the same servers (dropped afterwards). Its make targets
    write the checkout's .local/env.sh for the sandbox: the one there before is put back after."""
    run_id = os.environ["OVERNIGHT_TEST_RUN_ID"]
    base = from_value(POSTGRES_CONN_ID, os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
    app, meta = f"ovt_{run_id}_demo", f"ovt_{run_id}_demo_af"
    devenv.create_database(base, app)
    redis_url = devenv.pick_redis_db(os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"], f"test-demo-{run_id}")
    home = tmp_path_factory.mktemp("demo-airflow-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "OVERNIGHT_"))}
    env.update({
        "AIRFLOW_CONN_OVERNIGHT_POSTGRES": postgres_dsn(base, dbname=app),
        "AIRFLOW_CONN_OVERNIGHT_REDIS": redis_url,
        "OVERNIGHT_AIRFLOW_DB": meta,
        "AIRFLOW_HOME": str(home),
        "OVERNIGHT_CACHE_DIR": str(home / "cache"),
    })
    env_sh = ROOT / ".local" / "env.sh"
    kept = env_sh.read_text() if env_sh.exists() else None
    try:
        yield env
    finally:
        if kept is not None:
            devenv.write_private(env_sh, kept)
    with psycopg.connect(postgres_dsn(base, dbname="postgres"), autocommit=True) as conn:
        for name in (app, meta):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def _make(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=540)


@pytest.mark.slow
def test_demo_prints_progress_table_and_log_path_in_at_most_40_lines(sandbox):
    proc = _make(sandbox, "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) <= 40, proc.stdout
    assert proc.stderr == ""
    progress = [m for m in map(PROGRESS.match, lines) if m]
    assert [m["code"] for m in progress] == MARKETS
    assert all(m["done"] == m["total"] for m in progress)
    assert sum(int(m["total"].replace(",", "")) for m in progress) == 1000  # every demo user served once
    header = lines.index(next(line for line in lines if line.startswith("market  session")))
    assert [line.split()[0] for line in lines[header + 2:header + 6]] == MARKETS
    assert all(line.split()[4] == "completed" for line in lines[header + 2:header + 6])
    assert "Airflow task logs" not in proc.stdout and "[info" not in proc.stdout  # the logs went to the file
    log = ROOT / lines[-1].split(": ", 1)[1]
    assert lines[-1].startswith("Full log (Airflow and task logs): .local/logs/demo-") and log.is_file()
    text = log.read_text()
    assert text.count("DagRun Finished: dag_id=overnight_scoring_") == 4
    assert "job run" in text and "completed" in text
    log.unlink()


@pytest.mark.slow
def test_run_with_redis_down_warns_and_completes_and_postgres_down_stops(sandbox, tmp_path):
    log = tmp_path / "run.log"  # not in the checkout's .local/logs
    down = {**sandbox, "AIRFLOW_CONN_OVERNIGHT_REDIS": "redis://127.0.0.1:1/0", "OVERNIGHT_CLI_LOG": str(log)}
    # a session after any the sandbox ran (docs/audit.md: an older session's documents are not the latest, so
    # they would not be warmed at all); run ahead of its schedule, it is judged now (docs/freshness.md)
    day = sessions.next_run("XLON", timedelta(0), datetime.now(UTC) + timedelta(days=14), inclusive=False)[0].isoformat()
    proc = _make(down, "run", "MARKET=XLON", f"DATE={day}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.startswith("warning: connection 'overnight_redis' (redis://127.0.0.1:1/0): cannot connect")
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"XLON    {day}"))
    assert row.split()[4] == "completed"
    assert "note: XLON: Redis cache not warmed" in proc.stdout
    assert proc.stdout.splitlines()[-1] == f"Full log (Airflow and task logs): {log}"
    assert "DagRun Finished: dag_id=overnight_scoring_xlon" in log.read_text()

    pg_down = {**sandbox, "AIRFLOW_CONN_OVERNIGHT_POSTGRES": "postgresql://postgres@127.0.0.1:1/overnight"}
    proc = _make(pg_down, "run", "MARKET=XLON", f"DATE={day}")
    assert proc.returncode == 2
    assert "error: connection 'overnight_postgres'" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert f"XLON    {day}" not in proc.stdout


def test_a_failed_run_prints_its_cause(sandbox, tmp_path):
    assert _make(sandbox, "migrate", "airflow-setup").returncode == 0  # .local/env.sh for the sandbox, schemas
    proc = subprocess.run(
        ["bash", "-c", "set -a && . .local/env.sh && set +a && "
         ".venv/bin/python -m overnight.dev.cli run --market XNYS --date 2026-11-25 --batch-size -1"],
        cwd=ROOT, env={**sandbox, "OVERNIGHT_CLI_LOG": str(tmp_path / "run.log")}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "  XNYS did not run; cause:" in lines, proc.stdout
    cause = lines.index("  XNYS did not run; cause:")
    assert lines[cause + 1] == "    cli: ParamValidationError: Invalid input for param batch_size: -1 is less than the minimum of 1"
    assert [line.split()[:5] for line in lines if line.startswith("XNYS    ")] == [
        ["XNYS", "2026-11-25", "0", "0", "None"]]
    assert len(lines) <= 40 and proc.stderr == ""
