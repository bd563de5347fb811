"""A live Airflow of its own for a test: api-server, scheduler, dag-processor, triggerer on a fresh metadata DB.

Start it with `live_airflow(tmp_path, app_dsn)`; it stops every process it started (by process group)
and drops its metadata database on exit. Component logs are in `tmp_path/<component>.log`.

By default the scheduler creates no scheduled (timetable or asset) runs, only the runs a test triggers:
an unpaused market DAG would otherwise start today's session at once whenever the test happens to run
inside that market's lead window (XLON from 06:00 UTC, XNYS from 12:30, ...), and queue the test's own
run behind it. A test that needs scheduled or asset-triggered runs passes `scheduled=True` and picks,
with `quiet_market()`, a market with no scheduled run due while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cryptography.fernet import Fernet

from overnight.adapters.connections import postgres_dsn
from overnight.dev import devenv
from overnight.domain.markets import Market, load_markets
from overnight.domain.sessions import next_run
from tests.support import databases
from tests.support import reliability as R
from tests.support.ports import free_port

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def quiet_market(clear_for: timedelta = timedelta(minutes=45), now: datetime | None = None) -> Market:
    """A market whose next scheduled run (open - lead) is at least `clear_for` away (codes in order).

    With catchup off, unpausing a DAG inside its lead window starts that session's run at once, so a
    test that runs the scheduler for real must use a market whose window is not open (the four markets'
    windows never all overlap: XTKS 22:00, XLON 06:00/07:00, BVMF and XNYS 11:00-14:30 UTC).
    """
    now = now or datetime.now(UTC)
    for market in load_markets().markets:
        # The first session still to open, as the timetable picks it; its run time may already be past.
        _, opens = next_run(market.code, timedelta(0), now, inclusive=False)
        run_at = opens - market.lead
        if run_at - now >= clear_for:
            return market
    raise AssertionError(f"every market has a scheduled run due within {clear_for} of {now}")


@dataclass
class LiveAirflow:
    """A running stack: its environment, metadata DSN and log folder."""

    env: dict[str, str]
    af_dsn: str
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def airflow(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Runs the `airflow` CLI against this stack."""
        return subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=str(R.ROOT))

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.env['AIRFLOW__API__BASE_URL']}/api/v2/monitor/health", timeout=5,
                             trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def _api(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A call of the stack's REST API as admin (no `airflow` CLI process: each costs seconds of start-up), once
        the api-server answers."""
        R.wait_until(self._api_up, 180, 0.5, "the api-server to answer")
        resp = httpx.request(method, f"{self.env['AIRFLOW__API__BASE_URL']}/api/v2{path}", json=body, timeout=60,
                             trust_env=False, headers={"Authorization": f"Bearer {self.token()}"})
        assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
        return dict(resp.json())

    def unpause(self, dag_id: str) -> None:
        """Unpauses the DAG (PATCH /api/v2/dags/{dag_id})."""
        assert self._api("PATCH", f"/dags/{dag_id}", {"is_paused": False})["is_paused"] is False

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any], logical_date: str | None = None) -> None:
        """Triggers a run (POST /api/v2/dags/{dag_id}/dagRuns; no logical date unless given) and unpauses the DAG."""
        run = self._api("POST", f"/dags/{dag_id}/dagRuns",
                        {"dag_run_id": run_id, "conf": conf, "logical_date": logical_date})
        assert run["dag_run_id"] == run_id, run
        self.unpause(dag_id)

    def dag_parsed(self, dag_id: str) -> bool:
        """Whether the dag-processor has written `dag_id` to the metadata database."""
        with psycopg.connect(self.af_dsn) as c:
            return bool(c.execute("SELECT 1 FROM dag WHERE dag_id = %s", (dag_id,)).fetchone())

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        """The DAG run's state, None before it exists."""
        with psycopg.connect(self.af_dsn) as c:
            row = c.execute("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)).fetchone()
        return row[0] if row else None

    def wait_finished(self, dag_id: str, run_id: str, timeout: float = 420) -> str:
        """Waits for the run to end; returns success or failed."""
        def done() -> str | None:
            state = self.run_state(dag_id, run_id)
            return state if state in ("success", "failed") else None

        return R.wait_until(done, timeout, 1, f"{dag_id} {run_id} to finish")

    def token(self, login: str = "admin") -> str:
        """A JWT of a dev login (its password from the simple auth manager's file) from the api-server."""
        passwords = json.loads(Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())
        resp = httpx.post(f"{self.env['AIRFLOW__API__BASE_URL']}/auth/token", trust_env=False, timeout=30,
                          json={"username": login, "password": passwords[login]})
        assert resp.status_code == 201, f"token for {login}: {resp.status_code} {resp.text[:300]}"
        return str(resp.json()["access_token"])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, login: str = "admin") -> str:
        """A finished task's log as the api-server's REST API serves it (the UI's source), as text."""
        resp = httpx.get(
            f"{self.env['AIRFLOW__API__BASE_URL']}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
            f"/logs/{try_number}", params={"full_content": "true"}, trust_env=False, timeout=60,
            headers={"Authorization": f"Bearer {self.token(login)}", "Accept": "application/json"})
        assert resp.status_code == 200, f"log of {dag_id}/{run_id}/{task_id}: {resp.status_code} {resp.text[:300]}"
        content = resp.json()["content"]
        return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in content)

    def listeners(self) -> set[tuple[str, int, str]]:
        """(address, port, command) of every TCP socket listening in the stack's processes and their children."""
        from tests.support.ports import listeners

        return listeners([p.pid for p in self.procs])

    def log_tail(self, component: str, chars: int = 3000) -> str:
        try:
            return (self.logs / f"{component}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextmanager
def live_airflow(tmp_path: Path, app_dsn: str, *, tag: str = "live", scheduled: bool = False,
                 **extra_env: str) -> Iterator[LiveAirflow]:
    """Starts the four components against `app_dsn` (the `overnight_postgres` connection) and a new metadata DB.

    `scheduled=False` (the default) turns the scheduler's timetable and asset-triggered runs off.
    """
    base = R.base_info()
    meta_name = f"{base.schema}_{tag}_af"
    databases.clone(databases.airflow_template(), meta_name)  # `airflow db migrate` done once per suite run
    api_port = free_port()
    home = tmp_path / "airflow-home"
    home.mkdir(parents=True, exist_ok=True)
    env = R.subprocess_env(
        AIRFLOW_CONN_OVERNIGHT_POSTGRES=app_dsn,
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgres_dsn(base, dbname=meta_name).replace("postgresql://",
                                                                                      "postgresql+psycopg2://", 1),
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="4",
        **devenv.AIRFLOW_SETTINGS,  # as the image runs
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{api_port}",
        AIRFLOW__API_AUTH__JWT_SECRET=uuid.uuid4().hex,
        # One key for all four: each would otherwise write its own airflow.cfg with a random one at start (the
        # metadata DB is a template's clone, no `airflow db migrate` writes it first), and the triggerer could not
        # decrypt the triggers the scheduler wrote.
        AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(),
        AIRFLOW__API__SECRET_KEY=uuid.uuid4().hex,
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=str(scheduled),
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_SEC="2",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
        OVERNIGHT_CLI_LOG="-",
        **extra_env,
    )
    stack = LiveAirflow(env=env, af_dsn=postgres_dsn(base, dbname=meta_name), logs=tmp_path)
    try:
        for name in COMPONENTS:
            # as `make airflow`: no log server (it would listen on every interface, and on the port of the
            # stack beside it); the api-server reads the task logs from the files
            args = ["api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"] \
                if name == "api-server" else [name, "--skip-serve-logs"] if name in ("scheduler", "triggerer") \
                else [name]
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
            stack.procs.append(subprocess.Popen([str(Path(sys.executable).with_name("airflow")), *args], env=env,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                cwd=str(R.ROOT)))
        yield stack
    finally:
        for proc in reversed(stack.procs):
            R.stop_group(proc)
        if not os.environ.get("OVERNIGHT_KEEP_TEST_DATA"):
            databases.drop(meta_name)
