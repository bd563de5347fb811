"""A task process killed with SIGKILL in the middle of a batch.

1. `make run`-style (`python -m overnight.dev.cli run`, in-process dag.test) killed mid-way, then run again:
   the same job run continues (same row, same correlation id), completes, nothing is duplicated.
2. Under the real scheduler (LocalExecutor, the stack of `tests/support/live_airflow.py`): the task
   runner of a `score_batch` task instance is SIGKILLed while it scores; Airflow retries the task, the
   DAG run succeeds, nothing is duplicated.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.support import reliability as R
from tests.support.live_airflow import COMPONENTS, live_airflow

pytestmark = pytest.mark.slow

MARKET = "XTKS"


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
                R.stop_group(first, signal.SIGKILL)  # SIGKILL: no clean-up code of ours or Airflow's runs
            finally:
                R.stop_group(first, signal.SIGKILL)
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
    with R.scratch_database("kill_sched", users=3000) as dsn, live_airflow(tmp_path, dsn, tag="sched") as af:
        R.wait_until(lambda: af.dag_parsed(dag_id), 180, 1, "the dag-processor to parse the DAGs")
        af.trigger(dag_id, "reliability_kill", {"session_date": R.S_KILL_SCHED.isoformat(), "batch_size": 250})
        scheduler = af.procs[COMPONENTS.index("scheduler")]

        with psycopg.connect(dsn, autocommit=True) as conn:
            expected = R.served(conn, MARKET, R.S_KILL_SCHED)
            runners = R.wait_until(lambda: _task_runners(scheduler, af.af_dsn, dag_id, "score_batch"), 240, 0.1,
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

            state = af.wait_finished(dag_id, "reliability_kill")
            with psycopg.connect(af.af_dsn) as c:
                tis = c.execute(
                    "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = %s"
                    " AND run_id = %s ORDER BY task_id, map_index", (dag_id, "reliability_kill")).fetchall()
            assert state == "success", f"{victim_cmd}: {tis}\n{af.log_tail('scheduler')}"
            retried = [t for t in tis if t[0] == "score_batch" and t[3] > 1]
            assert retried, f"no score_batch was retried after the kill: {tis}"
            assert not [t for t in tis if t[2] not in ("success", "skipped")], tis
            out = R.check_invariants(conn, MARKET, R.S_KILL_SCHED)
            assert out.status == "completed" and out.completed == expected
            assert out.dag_run_id == "reliability_kill"
