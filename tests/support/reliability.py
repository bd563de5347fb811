"""Helpers of the reliability suite: invariants, scratch databases, a private Postgres, subprocess runs.

Everything here talks to real servers: the test run's Postgres (the one `AIRFLOW_CONN_OVERNIGHT_POSTGRES`
points at), a private Postgres started from pgserver's binaries when a test must restart it, and real
`python -m overnight.dev.cli` / `airflow` subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
from airflow.sdk import Connection

from overnight.adapters.connections import POSTGRES_CONN_ID, from_value
from overnight.domain import sessions
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
EVENT_TYPES = ("CALC_STARTED", "INPUTS_CAPTURED", "SCORES_COMPUTED", "CALC_COMPLETED")

# Session dates of this suite (all markets trade on them), kept apart from the other suites' dates.
S_KILL_CLI = date(2027, 1, 5)
S_KILL_SCHED = date(2027, 1, 6)
S_PG_RESTART = date(2027, 1, 7)
S_REDIS_DOWN = date(2027, 1, 12)
S_PROVIDERS = date(2027, 1, 13)
S_BAD_DATA = date(2027, 1, 14)
S_DUP_THREADS = date(2027, 1, 19)
S_DUP_DAGTEST = date(2027, 1, 20)
S_SECURITY = date(2027, 1, 21)
S_HOSTILE = date(2027, 1, 26)


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Sends `sig` to the process group `proc` leads (started with `start_new_session`) and waits for it;
    SIGKILL when it has not ended 30 s later."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Polls `pred` until it returns a truthy value; raises AssertionError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def served(conn: psycopg.Connection, market: str, session: date) -> set[str]:
    """The active users `market` serves on `session` (the contract's rule, computed in Python)."""
    return {str(u) for u, m in conn.execute("SELECT id, markets FROM users WHERE active")
            if sessions.serving_market(m, session) == market}


def job_rows(conn: psycopg.Connection, market: str, session: date) -> list[tuple[Any, ...]]:
    """Every job-run row of (market, session), newest first."""
    return conn.execute(
        "SELECT id, status, users_processed, users_failed, correlation_id, error_details, metrics, dag_run_id"
        " FROM overnight_job_runs WHERE market = %s AND session_date = %s ORDER BY started_at DESC",
        (market, session)).fetchall()


@dataclass
class Outcome:
    """What a job run left behind, after the invariants held."""

    job_id: str
    correlation_id: str
    status: str
    completed: set[str]
    failed: dict[str, tuple[str, str]]
    error_details: dict[str, Any] | None
    metrics: dict[str, Any] | None
    dag_run_id: str | None


def check_invariants(conn: psycopg.Connection, market: str, session: date, *, rows: int = 1,
                     finished: bool = True) -> Outcome:
    """Asserts the suite's invariants on the newest job run of (market, session) and returns it.

    - `rows` job-run rows for the market and session (1 unless `force` was used);
    - exactly the four event types, once each, per completed user of that correlation id, after a CALC_STARTED and
      CALC_FAILED per earlier failed attempt (docs/audit.md); a failed user's attempts as such pairs; no event for
      anyone else (no half-written user);
    - every completed user's document in `recommendation_history` under that job run;
    - the row's counts match `overnight_job_users` (failed: the failed rows and the audience's users never reached);
    - when `finished`, the row is not left `started`.
    """
    conn.rollback()
    found = job_rows(conn, market, session)
    assert len(found) == rows, f"{market} {session}: {len(found)} job-run rows, expected {rows}: {found}"
    job_id, status, processed, failed_n, corr, details, metrics, dag_run_id = found[0]
    statuses = conn.execute(
        "SELECT user_id::text, status, stage, error FROM overnight_job_users WHERE job_run_id = %s",
        (job_id,)).fetchall()
    completed = {u for u, s, *_ in statuses if s == "completed"}
    failed = {u: (st or "", err or "") for u, s, st, err in statuses if s == "failed"}
    per_user = dict(conn.execute(
        "SELECT user_id::text, array_agg(event_type::text ORDER BY created_at) FROM calculation_events"
        " WHERE correlation_id = %s GROUP BY user_id", (corr,)).fetchall())

    def well_formed(types: list[str], done: bool) -> bool:
        attempts = types[:-4] if done else types
        return ((not done or types[-4:] == list(EVENT_TYPES)) and (done or bool(attempts))
                and attempts == ["CALC_STARTED", "CALC_FAILED"] * (len(attempts) // 2))

    bad = [(u, types) for u, types in per_user.items() if not well_formed(types, u in completed)]
    assert not bad, f"users without exactly the four events (or failed attempts' pairs before them): {bad[:5]}"
    with_events = set(per_user)
    assert with_events == completed | set(failed), (
        f"events for {len(with_events)} users, {len(completed)} completed and {len(failed)} failed rows; "
        f"events without a row: {sorted(with_events - completed - set(failed))[:5]}, "
        f"completed without events: {sorted(completed - with_events)[:5]}")
    docs = {r[0] for r in conn.execute(
        "SELECT user_id::text FROM recommendation_history WHERE job_run_id = %s", (job_id,))}
    assert completed <= docs, f"completed users without a document: {sorted(completed - docs)[:5]}"
    assert docs <= completed, f"documents of users not completed: {sorted(docs - completed)[:5]}"
    if finished:
        assert status in ("completed", "partial", "failed"), f"job run left {status!r}"
        assert processed == len(completed), (processed, len(completed))
        # every user of the run's audience is counted once: completed, failed with a row, or never reached (a
        # batch that failed as a whole writes no row for its users)
        unreached = max(0, (metrics or {}).get("users_total", 0) - len(completed) - len(failed))
        assert failed_n == len(failed) + unreached, (failed_n, len(failed), unreached, metrics)
    return Outcome(str(job_id), str(corr), status, completed, failed, details, metrics, dag_run_id)


def no_task_running(af_dsn: str, dag_id: str) -> list[tuple[str, int, str]]:
    """Task instances of `dag_id` still queued/running in Airflow's metadata DB (should be empty)."""
    with psycopg.connect(af_dsn) as c:
        return c.execute(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = %s"
            " AND state IN ('running', 'queued', 'scheduled', 'restarting', 'up_for_retry', 'deferred')",
            (dag_id,)).fetchall()


def airflow_meta_dsn() -> str:
    """The Airflow metadata database of this test run as a libpq DSN."""
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://", 1)


def base_info() -> Connection:
    """The test run's `overnight_postgres` connection."""
    return from_value(POSTGRES_CONN_ID, os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])


@contextmanager
def scratch_database(tag: str, *, users: int = 0, seed_value: int = 7) -> Iterator[str]:
    """A migrated (and optionally seeded) application database of its own on the test server, cloned from the
    suite run's template of that data set; dropped after."""
    from tests.support import databases

    name = f"{base_info().schema}_{tag}"
    dsn = databases.clone(databases.app_template(users, seed_value), name)
    try:
        yield dsn
    finally:
        if not os.environ.get("OVERNIGHT_KEEP_TEST_DATA"):
            databases.drop(name)


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The test environment for a child process (package importable, no proxies)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT)]), "NO_PROXY": "*",
           "PYTHONUNBUFFERED": "1"}
    env.update(overrides)
    return env


def cli_run(market: str, session: date, env: dict[str, str], *, batch_size: int | None = None,
            log: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts `python -m overnight.dev.cli run` (what `make run` does) as a child process in its own group."""
    cmd = [sys.executable, "-m", "overnight.dev.cli", "run", "--market", market, "--date", session.isoformat()]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    env = {**env, "OVERNIGHT_CLI_LOG": "-"}  # every Airflow and task log line in `log`, as the tests scan it
    return subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


# --------------------------------------------------------------------------- a private Postgres


class PrivatePostgres:
    """A throw-away PostgreSQL 16 (pgserver's binaries) in a temporary directory, on a free port.

    As root it runs as the `pgserver` system user (Postgres refuses root), like `overnight.dev.devenv`.
    """

    def __init__(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.user = self._pg_user()
        self.dir = Path(tempfile.mkdtemp(prefix="overnight-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if self.user:
            import pwd

            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
        self.start()

    @staticmethod
    def _pg_user() -> str | None:
        if os.geteuid() != 0:
            return None
        from overnight.dev import devenv

        return devenv._pg_user()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.bin / tool), *args], capture_output=True, text=True, user=self.user,
                              timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {proc.stdout}{proc.stderr}{self.log_tail()}")
        return proc

    def log_tail(self) -> str:
        log = self.dir / "server.log"
        try:
            return log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def opts(self) -> str:
        return f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=100"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-o", self.opts, "-l",
                  str(self.dir / "server.log"), "start")

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every connection is terminated, the server comes back on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "-o", self.opts, "-l",
                  str(self.dir / "server.log"), "restart")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create(self, name: str | None = None) -> str:
        """Creates a database; returns its DSN."""
        name = name or f"ovt_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
