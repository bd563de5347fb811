"""A task process killed with SIGKILL in the middle of a batch.

1. `make run`-style (`python -m overnight.cli run`, in-process dag.test) killed mid-way, then run again:
   the same job run continues (same row, same correlation id), completes, nothing is duplicated.
2. Under the real scheduler (LocalExecutor, with api-server and dag-processor as subprocesses): the task
   runner of a `score_batch` task instance is SIGKILLed while it scores; Airflow retries the task, the
   DAG run succeeds, nothing is duplicated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest

from overnight.connections import ConnInfo, parse_connection, postgres_dsn
from tests.support import reliability as R

pytestmark = pytest.mark.slow

MARKET = "XTKS"


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
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


def test_cli_run_killed_mid_way_then_rerun_continues_the_same_job(airflow_db, tmp_path: Path) -> None:
    with R.scratch_database("kill_cli", users=3000) as dsn:
        env = R.subprocess_env(AIRFLOW_CONN_OVERNIGHT_POSTGRES=dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            expected = R.served(conn, MARKET, R.S_KILL_CLI)
            assert len(expected) > 500

            def written() -> int:
                return conn.execute("SELECT count(*) FROM overnight_job_users").fetchone()[0]

            first = R.cli_run(MARKET, R.S_KILL_CLI, env, batch_size=50, log=tmp_path / "first.log")
            try:
                R.wait_until(lambda: written() > 0 or first.poll() is not None, 180, 0.05, "a first batch")
                assert first.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
                _kill_group(first)  # SIGKILL: no clean-up code of ours or Airflow's runs
            finally:
                _kill_group(first)
            done_at_kill = written()
            assert 0 < done_at_kill < len(expected), "killed too late to prove anything"
            killed = R.check_invariants(conn, MARKET, R.S_KILL_CLI, finished=False)
            assert killed.status == "started"  # nobody wrote an outcome: the row says so

            second = R.cli_run(MARKET, R.S_KILL_CLI, env, batch_size=50, log=tmp_path / "second.log")
            assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
            out = R.check_invariants(conn, MARKET, R.S_KILL_CLI)
        assert (out.job_id, out.correlation_id) == (killed.job_id, killed.correlation_id)
        assert out.status == "completed" and out.completed == expected
        assert out.metrics["users_skipped_already_done"] == 0  # completed users are not even loaded again
        assert not out.failed


# --------------------------------------------------------------------------- the real scheduler


def _airflow(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(R.ROOT))


def _task_runners(scheduler: subprocess.Popen[bytes], af_dsn: str, dag_id: str, task_id: str
                  ) -> list[psutil.Process]:
    """Task-runner processes (`airflow worker -- <ti id>`) under OUR scheduler running dag_id/task_id."""
    runners: dict[str, psutil.Process] = {}
    try:
        tree = psutil.Process(scheduler.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in tree:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        found = re.match(r"airflow worker -- ([0-9a-f-]{36})", cmd.strip())
        if found:
            runners[found.group(1)] = p
    if not runners:
        return []
    with psycopg.connect(af_dsn) as c:
        ids = {str(r[0]) for r in c.execute(
            "SELECT id FROM task_instance WHERE dag_id = %s AND task_id = %s AND state = 'running'"
            " AND id::text = ANY(%s)", (dag_id, task_id, list(runners)))}
    return [p for ti, p in runners.items() if ti in ids]


def test_scheduler_task_sigkilled_mid_batch_is_retried_and_nothing_doubles(airflow_db, tmp_path: Path) -> None:
    dag_id = f"overnight_scoring_{MARKET.lower()}"
    base = R.base_info()
    meta_name = f"{base.schema}_sched_af"
    from overnight.devenv import create_database

    create_database(base, meta_name)
    meta = ConnInfo(**{**base.__dict__, "schema": meta_name})
    api_port = R.free_port()
    home = tmp_path / "home"
    home.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with R.scratch_database("kill_sched", users=3000) as dsn:
            env = R.subprocess_env(
                AIRFLOW_CONN_OVERNIGHT_POSTGRES=dsn,
                AIRFLOW_HOME=str(home),
                AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgres_dsn(meta).replace(
                    "postgresql://", "postgresql+psycopg2://", 1),
                AIRFLOW__CORE__EXECUTOR="LocalExecutor",
                AIRFLOW__CORE__PARALLELISM="4",
                AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
                AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
                AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{api_port}",
                AIRFLOW__API_AUTH__JWT_SECRET=uuid.uuid4().hex,
                AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
                AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_SEC="2",
                AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
                AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
                AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
            )
            mig = _airflow("db", "migrate", env=env, timeout=300)
            assert mig.returncode == 0, mig.stderr[-3000:]
            for name, args in (("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(api_port),
                                               "--workers", "1"]),
                               ("scheduler", ["scheduler"]), ("dag-processor", ["dag-processor"])):
                log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
                procs.append(subprocess.Popen([str(Path(sys.executable).with_name("airflow")), *args], env=env,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                              cwd=str(R.ROOT)))
            af = postgres_dsn(meta)

            def parsed() -> bool:
                with psycopg.connect(af) as c:
                    return bool(c.execute("SELECT 1 FROM dag WHERE dag_id = %s", (dag_id,)).fetchone())

            R.wait_until(parsed, 180, 1, "the dag-processor to parse the DAGs")
            conf = {"session_date": R.S_KILL_SCHED.isoformat(), "batch_size": 250}
            trig = _airflow("dags", "trigger", dag_id, "--run-id", "reliability_kill", "--conf", json.dumps(conf),
                            env=env)
            assert trig.returncode == 0, trig.stdout + trig.stderr
            unp = _airflow("dags", "unpause", dag_id, env=env)
            assert unp.returncode == 0, unp.stdout + unp.stderr

            with psycopg.connect(dsn, autocommit=True) as conn:
                expected = R.served(conn, MARKET, R.S_KILL_SCHED)
                runners = R.wait_until(lambda: _task_runners(procs[1], af, dag_id, "score_batch"), 240, 0.1,
                                       "a running score_batch task")
                # Mid-batch: the task runner holds a connection of the `overnight` application.
                R.wait_until(lambda: conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'overnight' AND pid <> pg_backend_pid()").fetchone()[0], 30, 0.05,
                    "the task's database session")
                time.sleep(0.3)
                victim = runners[0]
                victim_cmd = " ".join(victim.cmdline())
                victim.send_signal(signal.SIGKILL)

                def finished() -> str | None:
                    with psycopg.connect(af) as c:
                        row = c.execute("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s",
                                        (dag_id, "reliability_kill")).fetchone()
                    return row[0] if row and row[0] in ("success", "failed") else None

                state = R.wait_until(finished, 420, 1, "the DAG run to finish")
                with psycopg.connect(af) as c:
                    tis = c.execute(
                        "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = %s"
                        " AND run_id = %s ORDER BY task_id, map_index", (dag_id, "reliability_kill")).fetchall()
                assert state == "success", f"{victim_cmd}: {tis}\n{(tmp_path / 'scheduler.log').read_text()[-3000:]}"
                retried = [t for t in tis if t[0] == "score_batch" and t[3] > 1]
                assert retried, f"no score_batch was retried after the kill: {tis}"
                assert not [t for t in tis if t[2] not in ("success", "skipped")], tis
                out = R.check_invariants(conn, MARKET, R.S_KILL_SCHED)
                assert out.status == "completed" and out.completed == expected
                assert out.dag_run_id == "reliability_kill"
    finally:
        for p in reversed(procs):
            _kill_group(p, signal.SIGTERM)
        admin = postgres_dsn(ConnInfo(**{**parse_connection("overnight_postgres",
                                                              os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"]).__dict__,
                                        "schema": "postgres"}))
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{meta_name}" WITH (FORCE)')
