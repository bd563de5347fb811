"""Commands fail clearly, naming what is wrong, and write nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT / "include"), **env}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full, timeout=120)


def test_bad_postgres_connection_stops_at_once_naming_it():
    proc = _run(["overnight.dev.devenv", "up"], AIRFLOW_CONN_OVERNIGHT_POSTGRES="postgresql://app:secretpw@127.0.0.1:1/x")
    assert proc.returncode == 2
    assert "overnight_postgres" in proc.stderr and "127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr and "secretpw" not in proc.stderr


def test_redis_down_is_a_warning_not_an_error(monkeypatch, capsys):
    """The runs complete without Redis (cache recorded "not warmed"), so the set-up only warns."""
    from overnight.dev import devenv

    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_REDIS", "redis://:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("OVERNIGHT_AIRFLOW_DB", f"ovt_{os.environ['OVERNIGHT_TEST_RUN_ID']}_af")
    env = devenv.environment()
    err = capsys.readouterr().err
    assert env["AIRFLOW_CONN_OVERNIGHT_REDIS"] == "redis://:hunter2@127.0.0.1:1/0"
    assert err.startswith("warning: connection 'overnight_redis' (redis://:***@127.0.0.1:1/0): cannot connect")
    assert "record the cache as 'not warmed'" in err and "hunter2" not in err


def test_run_unknown_market_or_non_session_exits_non_zero_writing_nothing(conn, pg_dsn):
    before = conn.execute("SELECT count(*) FROM overnight_job_runs").fetchone()[0]
    unknown = _run(["overnight.dev.cli", "run", "--market", "XNYZ"])
    holiday = _run(["overnight.dev.cli", "run", "--market", "XNYS", "--date", "2026-12-25"])
    assert unknown.returncode == 2 and "XNYZ" in unknown.stderr
    assert holiday.returncode == 2 and "2026-12-25 is not a XNYS session" in holiday.stderr
    assert conn.execute("SELECT count(*) FROM overnight_job_runs").fetchone()[0] == before
