"""`make bench USERS=N`: the market DAGs under the real scheduler, against the raw floors.

On fresh databases of its own it seeds N users (timed apart), starts an api-server, a scheduler and a
dag-processor (LocalExecutor, or CeleryExecutor with two workers), and measures in one run:

- `wall_s`: from triggering the four market DAGs for one session day to the last finalize;
- `floor_orch_s`: a no-op DAG of the same shape and number of mapped tasks under the same scheduler;
- `floor_io_s`: writing the same rows (the chunks of events and documents, the snapshot rows they point at, the
  latest documents) with COPY and the same Redis documents packed as the night's warm packs them, without the
  pipeline's logic;
- per-batch p50/p95, the peak RSS of one task process, rows and keys written;
- its own peak RSS (it seeds and runs the I/O floor itself, both streaming) and its children's;
- the dashboard through the api-server: 8 concurrent clients for 20 s, cache hit, miss and a no-op route.

Its last line is one JSON object. One module (~700 lines) on purpose: a developer tool whose steps share the
run's processes and files; it is not shipped (.dockerignore leaves out overnight/dev).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis

from overnight.adapters import cache, migrate
from overnight.adapters.connections import POSTGRES_CONN_ID, from_value, postgres_dsn
from overnight.dev import devenv, loadgen, seed
from overnight.dev.devenv import api_host, write_private
from overnight.domain import freshness, sessions
from overnight.domain.markets import load_markets
from overnight.night import jobrun, loading

ROOT = Path(__file__).resolve().parents[3]
NOOP_DAG = '''"""No-op DAG with the market DAGs' shape: the orchestration floor of `make bench`."""
from datetime import datetime, timezone
from airflow.sdk import dag, task, TriggerRule, get_current_context

@dag(dag_id="overnight_bench_noop", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
     catchup=False, max_active_runs=8, tags=["operations"])
def overnight_bench_noop():
    @task
    def start():
        return {"n": int(get_current_context()["dag_run"].conf.get("batches", 1))}
    @task
    def fetch_rates(s):
        return {"rates": {}}
    @task
    def plan_batches(s):
        return [{"index": i, "label": f"batch {i + 1}"} for i in range(s["n"])]
    @task(map_index_template="{{ batch_label }}")
    def score_batch(batch, started, rates):
        get_current_context()["batch_label"] = batch["label"]
        return {"index": batch["index"]}
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def finalize():
        return None
    s = start()
    r = fetch_rates(s)
    score_batch.partial(started=s, rates=r).expand(batch=plan_batches(s)) >> finalize()

overnight_bench_noop()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_quiet(below_pct: float = 20.0, max_s: float = 90.0) -> float:
    """Waits until the machine's CPU is below `below_pct` over a second (autovacuum after the runs'
    inserts, the I/O floor's clean-up), at most `max_s`; returns the seconds waited. The dashboard is
    measured as it serves in the day, not against the night's aftermath."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_s and psutil.cpu_percent(interval=1.0) >= below_pct:
        pass
    return round(time.perf_counter() - t0, 1)


def calibration_s(rounds: int = 3) -> float:
    """CPU seconds of a fixed pure-Python workload (hashing, dicts, strings; the best of `rounds`): this
    machine's speed at the moment, so runs on a shared machine can be compared (lower is faster)."""
    best = math.inf
    for _ in range(rounds):
        t0 = time.process_time()
        table: dict[str, int] = {}
        for i in range(300_000):
            key = f"user-{i:08d}"
            table[key] = hash((key, i)) & 0xFFFF
        sum(sorted(table.values())[::7])
        best = min(best, time.process_time() - t0)
    return round(best, 3)



def _scalar(conn: psycopg.Connection[Any], query: str, params: Any = ()) -> Any:
    """The first column of the one row `query` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]

AUDIT_TABLES = ("calculation_chunks", "overnight_job_criteria", "overnight_job_rates", "overnight_job_scores")
SNAPSHOTS = ("overnight_job_criteria", "overnight_job_rates", "overnight_job_scores")  # what events point at

# The I/O floor's rows: (source, scratch table) pairs, each source's rows COPYed into its scratch table in the
# timed part. A source is a table or a view (the scratch table is made LIKE it, INCLUDING ALL: the same columns,
# defaults, constraints and indexes).
# What the night writes (migration 0011): its chunks of events and documents, the snapshot rows they point at,
# and the latest documents.
FLOOR_TABLES: tuple[tuple[str, str], ...] = (
    ("calculation_chunks", "bench_chunks"),
    ("overnight_job_scores", "bench_scores"),
    ("overnight_job_criteria", "bench_criteria"),
    ("recommendations", "bench_recs"),
)
# The I/O floor's Redis documents: (key suffix, recs document, portfolio document) per user.
FLOOR_DOCUMENTS = "SELECT user_id::text, document::text, portfolio::text FROM recommendations"
FLOOR_PIPELINE = 2_000  # users a Redis send (two SETs each)
FLOOR_BLOCK = 1 << 20  # bytes read from a dump file per COPY write
_DOC_HEADER = struct.Struct("<III")  # a document record in the dump file: the three lengths, then the bytes


def audit_size(conn: psycopg.Connection[Any], job_ids: list[str]) -> dict[str, float]:
    """The audit trail's size per completed user of the job runs `job_ids` (one night: the four markets' runs).

    Row data is `sum(pg_column_size(row.*))`: each row as stored, after Postgres's compression (values moved out of
    line counted at their compressed size), before indexes, without page and tuple-header overhead. It is the runs'
    `calculation_chunks` rows (events: every column but the documents; history: the documents and their times) and
    the snapshot rows the events point at instead of repeating them (`overnight_job_criteria`, `_rates`, `_scores`:
    migration 0011); the quotes and assets snapshots, older than the trail's redesign and a few kB per job run, are
    not counted. The storage test (`test_storage_per_user_per_night`) holds the same figure to its bound. Index
    bytes are `pg_indexes_size` summed over every partition of those tables: the whole tables', so per user only
    where the database holds this one night (the benchmark's fresh database)."""
    users = _scalar(conn, "SELECT count(*) FROM overnight_job_users WHERE job_run_id = ANY(%s::uuid[])"
                          " AND status = 'completed'", (job_ids,))
    rows, history = conn.execute(
        "SELECT coalesce(sum(pg_column_size(c.*)), 0), coalesce(sum(coalesce(pg_column_size(c.documents), 0)"
        " + coalesce(pg_column_size(c.generated_at), 0)), 0) FROM calculation_chunks c"
        " WHERE job_run_id = ANY(%s::uuid[])", (job_ids,)).fetchone() or (0, 0)
    snapshots = sum(int(_scalar(conn, f"SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {t} t"  # noqa: S608
                                      " WHERE job_run_id = ANY(%s::uuid[])", (job_ids,))) for t in SNAPSHOTS)
    indexes = _scalar(conn, "SELECT coalesce(sum(pg_indexes_size(p.relid)), 0) FROM unnest(%s::regclass[]) t,"
                            " pg_partition_tree(t) p WHERE p.isleaf", (list(AUDIT_TABLES),))
    users, rows, history, indexes = int(users), int(rows), int(history), int(indexes)  # sums of bigint: numeric
    per = max(1, users)
    return {"audit_users": users, "audit_events_bytes_per_user": round((rows - history) / per, 1),
            "audit_history_bytes_per_user": round(history / per, 1),
            "audit_snapshot_bytes_per_user": round(snapshots / per, 1),
            "audit_bytes_per_user": round((rows + snapshots) / per, 1),
            "audit_index_bytes_per_user": round(indexes / per, 1)}


def quotes_after_closes(conn: psycopg.Connection[Any], codes: list[str], moment: datetime) -> int:
    """Dates each seeded quote no earlier than its market's last close at `moment` (exchange-calendars), as a
    night's quotes are: fetched after the close they report. Returns how many quotes it moved.

    The seed dates its quotes 1 to 6 hours before it runs. Judged by docs/freshness.md at the runs' moment, a
    quote older than its market's previous close is stale, so without this the benchmark's world depended on the
    hour it ran at: at 21:04 UTC, after the B3 and New York closes, 91 % of the documents listed stale prices
    (81 symbols for a B3 user) and the history weighed 423 B a user against 286 at midday (`audit_bytes_per_user`
    1,597 against 1,449). A market that closes between the seeding and its run still finds its quotes stale, as
    a real night would."""
    moved = 0
    for code in codes:
        close = freshness.previous_close(code, moment)
        moved += conn.execute("UPDATE prices p SET as_of = %s FROM assets a WHERE a.id = p.asset_id"
                              " AND a.market = %s AND p.as_of < %s", (close, code, close)).rowcount
    conn.commit()
    return moved


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """`items` in lists of at most `n`."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def self_peak_rss_mb() -> dict[str, float]:
    """The benchmark's own peak memory: `bench_self_peak_rss_mb`, this process's peak RSS (it seeds and runs
    the I/O floor itself), and `bench_children_peak_rss_mb`, the largest of the processes it started and
    waited for (Airflow's components and, through them, the task runners; the load generator; `airflow db
    migrate`): the figure GNU time's "Maximum resident set size" gives for the whole `make bench`."""
    return {"bench_self_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bench_children_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


class Bench:
    """One benchmark run: its databases, Airflow home, processes and figures."""

    def __init__(self, users: int, executor: str, batch_size: int, seed_value: int, session: date | None,
                 api_workers: int = 2, parallelism: int = 4) -> None:
        self.users, self.executor, self.batch_size, self.seed_value = users, executor, batch_size, seed_value
        self.api_workers, self.parallelism = api_workers, parallelism
        self.id = uuid.uuid4().hex[:8]
        self.home = ROOT / ".local" / f"bench-{self.id}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = _free_port()
        self.password = os.environ.get("OVERNIGHT_ADMIN_PASSWORD") or secrets.token_urlsafe(18)  # never printed
        self.codes = load_markets().codes
        self.session = session or self._common_session()
        self.figures: dict[str, Any] = {"users": users, "executor": executor, "session": self.session.isoformat(),
                                        "batch_size": batch_size, "parallelism": parallelism,
                                        "api_workers": api_workers}

    def _common_session(self) -> date:
        """The next date on which every market trades (so every user is served once)."""
        d = date.today()
        while True:
            d = date.fromordinal(d.toordinal() + 1)
            if all(sessions.is_session(c, d) for c in self.codes):
                return d

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """Fresh databases and Redis db, Airflow home with the DAGs and the no-op DAG."""
        base = from_value(POSTGRES_CONN_ID, os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
        self.app_db, self.meta_db = f"bench_{self.id}", f"bench_{self.id}_af"
        for name in (self.app_db, self.meta_db):
            devenv.create_database(base, name)
        self.base = base
        self.dsn = postgres_dsn(base, dbname=self.app_db)
        meta = postgres_dsn(base, dbname=self.meta_db)
        self.redis_url = devenv.pick_redis_db(os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"], f"bench-{self.id}")
        dags = self.home / "dags"
        dags.mkdir(parents=True)
        for f in (ROOT / "dags").glob("*.py"):
            (dags / f.name).symlink_to(f)
        (dags / "overnight_bench_noop.py").write_text(NOOP_DAG)
        self.env = {
            **os.environ,
            **devenv.AIRFLOW_SETTINGS,  # as every deployment runs (the image's ENV)
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW_CONN_OVERNIGHT_POSTGRES": self.dsn,
            "AIRFLOW_CONN_OVERNIGHT_REDIS": self.redis_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.replace("postgresql://", "postgresql+psycopg2://", 1),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if self.executor == "celery" else "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            # only the DAGs the benchmark triggers run (it unpauses them): not the hourly preflight
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": str(self.api_workers),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # Only the runs the benchmark triggers: inside a market's lead window (XLON from 06:00 UTC, ...)
            # its unpaused DAG would also start today's scheduled run and be counted and timed with them.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",  # the one login it uses
            "OVERNIGHT_ADMIN_PASSWORD": self.password,
        }
        if self.executor == "celery":
            broker = self.redis_url  # its own Redis database, like the cache
            self.env.update({
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            })
        migrate.migrate(self.dsn)
        self._airflow(["db", "migrate"], timeout=300)
        self._airflow(["pools", "import", str(ROOT / "include" / "pools.json")])  # score_batch's pool
        devenv.make_private(self.home / "airflow.cfg")  # Airflow's generated secret keys
        write_private(self.home / "passwords.json", json.dumps({"admin": self.password}))

    def _airflow(self, args: list[str], timeout: int = 120) -> None:
        airflow = str(Path(sys.executable).with_name("airflow"))
        proc = subprocess.run([airflow, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"airflow {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def seed(self) -> None:
        """Seeds the users (timed apart from the run)."""
        t0 = time.perf_counter()
        with psycopg.connect(self.dsn) as conn:
            seed.seed(conn, self.users, self.seed_value, self.codes, dsn=self.dsn)
            self.figures["seed_quotes_redated"] = quotes_after_closes(conn, self.codes, datetime.now(UTC))
            conn.execute("ANALYZE")
        self.figures["seed_s"] = round(time.perf_counter() - t0, 1)

    def commands(self) -> dict[str, list[str]]:
        """The components' `airflow` arguments: api-server, scheduler, dag-processor (and Celery workers)."""
        commands = {
            "api-server": ["api-server", "--host", api_host(), "--port", str(self.port)],
            # no log server (`airflow serve-logs` listens on every interface): the task logs are files on this host
            "scheduler": ["scheduler", "--skip-serve-logs"],
            "dag-processor": ["dag-processor"],
        }
        if self.executor == "celery":
            for n in (1, 2):
                commands[f"worker-{n}"] = ["celery", "worker", "--concurrency", "1", "--skip-serve-logs",
                                           "--celery-hostname", f"w{n}-{self.id}@%h"]
        return commands

    def start_airflow(self) -> None:
        """Starts api-server, scheduler, dag-processor (and Celery workers); waits for the DAGs."""
        airflow = str(Path(sys.executable).with_name("airflow"))
        commands = self.commands()
        logs = self.home / "logs-components"
        logs.mkdir(exist_ok=True)
        for name, args in commands.items():
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
            self.procs[name] = subprocess.Popen([airflow, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.time() + 180
        while time.time() < deadline:
            with suppress(httpx.HTTPError):
                r = self.client.post("/auth/token", json={"username": "admin", "password": self.password})
                if r.status_code in (200, 201):
                    self.client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
                    break
            time.sleep(1)
        else:
            raise SystemExit(f"api-server did not answer; see {logs}")
        wanted = {f"overnight_scoring_{c.lower()}" for c in self.codes} | {"overnight_bench_noop"}
        while time.time() < deadline:
            r = self.client.get("/api/v2/dags", params={"limit": 100})
            if r.status_code == 200 and wanted <= {d["dag_id"] for d in r.json()["dags"]}:
                return
            time.sleep(1)
        raise SystemExit(f"DAGs not parsed within 180 s; see {logs}/dag-processor.log")

    # ------------------------------------------------------------------ runs

    def _trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        self.client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        r = self.client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        if r.status_code not in (200, 201):
            raise SystemExit(f"trigger {dag_id}: HTTP {r.status_code}: {r.text[:500]}")
        return str(r.json()["dag_run_id"])

    def _wait(self, runs: dict[str, str], timeout_s: float, sample: bool) -> tuple[float, dict[str, str]]:
        t0 = time.perf_counter()
        states: dict[str, str] = {}
        with self.sampling() if sample else nullcontext({"rss": 0}) as peak:
            while time.perf_counter() - t0 < timeout_s:
                for dag_id, run_id in runs.items():
                    if dag_id in states:
                        continue
                    r = self.client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
                    if r.status_code == 200 and r.json()["state"] in ("success", "failed"):
                        states[dag_id] = r.json()["state"]
                if len(states) == len(runs):
                    break
                time.sleep(2)
        if sample:
            self.figures["peak_rss_mb"] = round(peak["rss"] / 2**20, 1)
        if len(states) < len(runs):
            raise SystemExit(f"runs not finished within {timeout_s} s: {set(runs) - set(states)}")
        return time.perf_counter() - t0, states

    @contextmanager
    def sampling(self, figure: str = "cpu_s_by_process") -> Iterator[dict[str, int]]:
        """Samples the machine's processes (`_sample_processes`, its CPU figure as `figure`) while the block runs;
        yields the peak RSS of a task runner (`["rss"]`). However the block ends, the sampler is stopped and joined
        before the figures are read: a benchmark stopped mid-way by SIGTERM waited for it forever at exit."""
        stop = threading.Event()
        peak = {"rss": 0}
        sampler = threading.Thread(target=self._sample_processes, args=(stop, peak, figure), name=f"sampler-{figure}",
                                   daemon=True)
        sampler.start()
        try:
            yield peak
        finally:
            stop.set()
            sampler.join()

    def _sample_processes(self, stop: threading.Event, peak: dict[str, int], figure: str = "cpu_s_by_process") -> None:
        """Peak RSS of any one task process, and CPU seconds per kind of process (where the time goes) as
        the figure `figure`. Airflow's processes count only when they are this benchmark's (its components and
        their children): another Airflow on the machine (a test suite's, a second benchmark) is not its load.

        Every 0.5 s, one pass over the machine's processes: a process's kind is read from its command line when
        first seen and again while it is under 5 s old (a forked task runner retitles itself), its CPU times
        and (a task runner's) RSS at each pass. Reading every command line and every component's process tree
        at each pass took 37 ms of CPU a second with 88 processes on the machine, this 21 ms (10 s of sampling
        each, the sampler alone in a thread, 2026-12-07): CPU the night being measured shares its two cores with."""
        last: dict[int, float] = {}
        cpu: dict[str, float] = {}
        api = self.procs.get("api-server")
        api_pid = api.pid if api is not None else -1
        airflow_kinds = {"tasks", "scheduler", "dag-processor", "api-server"}
        seen: dict[tuple[int, float], tuple[str | None, bool]] = {}  # (pid, start) -> (kind, is a task runner)
        while not stop.is_set():
            now = time.time()
            table: dict[int, psutil.Process] = {}
            for p in psutil.process_iter(["ppid", "create_time"]):
                table[p.pid] = p
            kids: dict[int, list[int]] = {}
            for pid, p in table.items():
                kids.setdefault(p.info["ppid"], []).append(pid)
            ours: set[int] = set()
            todo = [proc.pid for proc in self.procs.values()]
            while todo:
                pid = todo.pop()
                if pid not in ours:
                    ours.add(pid)
                    todo.extend(kids.get(pid, ()))
            for pid, p in table.items():
                key = (pid, p.info["create_time"] or 0.0)
                known = seen.get(key)
                if known is None or now - key[1] < 5:
                    try:
                        cmd = " ".join(p.cmdline() or [])
                        name = p.name()
                    except (psutil.Error, TypeError):
                        continue
                    # the task runner titles itself "airflow worker -- <ti id>"; its supervisor adds the executor
                    runner = cmd.startswith("airflow worker -- ") and ":" not in cmd
                    # the benchmark's own processes first: its command line names the executor ("--executor
                    # celery"), which counted it as a task process under Celery
                    kind = ("bench" if "overnight.dev.bench" in cmd else
                            "loadgen" if "overnight.dev.loadgen" in cmd else
                            "tasks" if cmd.startswith("airflow worker") or "celery" in cmd else
                            "scheduler" if "scheduler" in cmd else "dag-processor" if "dag-processor" in cmd else
                            "api-server" if "api_server" in cmd or "api-server" in cmd else
                            "postgres" if name == "postgres" else
                            "redis" if "redis-server" in cmd else None)
                    if kind is None and "multiprocessing" in cmd:
                        up, hops = p.info["ppid"], 0
                        while up in table and up != api_pid and hops < 10:  # its workers (AIRFLOW__API__WORKERS > 1)
                            up, hops = table[up].info["ppid"], hops + 1  # are spawned children of the api-server
                        kind = "api-server" if up == api_pid else None
                    known = seen[key] = (kind, runner)
                kind, runner = known
                if kind is None or (kind in airflow_kinds and pid not in ours):
                    continue
                with suppress(psutil.Error):
                    if runner:
                        peak["rss"] = max(peak["rss"], p.memory_info().rss)
                    times = p.cpu_times()
                    t = times.user + times.system
                    cpu[kind] = cpu.get(kind, 0.0) + t - last.get(pid, t)
                    last[pid] = t
            stop.wait(0.5)
        self.figures[figure] = {k: round(v, 1) for k, v in sorted(cpu.items())}

    def _batches_per_market(self) -> dict[str, int]:
        out = {}
        with psycopg.connect(self.dsn) as conn:
            for code in self.codes:
                aud = jobrun.Audience(code, tuple(sessions.earlier_markets(code, self.session, self.codes)))
                where, params = aud.where()
                n = _scalar(conn, f"SELECT count(*) FROM users u WHERE {where}", params)
                size = loading.effective_batch_size(n, self.batch_size)
                out[code] = math.ceil(n / size) if n else 0
        return out

    def run_noop(self) -> None:
        """The orchestration floor: the same shape and number of mapped tasks, doing nothing. Its CPU by kind of
        process (`floor_orch_cpu_s_by_process`) is what a night's tasks cost before they do any work."""
        t0 = time.perf_counter()
        with self.sampling("floor_orch_cpu_s_by_process"):
            pending = {code: self._trigger("overnight_bench_noop", {"batches": n})
                       for code, n in self._batches_per_market().items()}
            while pending and time.perf_counter() - t0 < 1800:
                for key, run_id in list(pending.items()):
                    r = self.client.get(f"/api/v2/dags/overnight_bench_noop/dagRuns/{run_id}")
                    if r.status_code == 200 and r.json()["state"] in ("success", "failed"):
                        pending.pop(key)
                time.sleep(0.5)
            self.figures["floor_orch_s"] = round(time.perf_counter() - t0, 1)

    def run_markets(self) -> None:
        """Triggers every market DAG for the session and waits for the last finalize."""
        conf = {"session_date": self.session.isoformat(), "batch_size": self.batch_size}
        runs = {f"overnight_scoring_{c.lower()}": "" for c in self.codes}
        t0 = time.perf_counter()
        for dag_id in runs:
            runs[dag_id] = self._trigger(dag_id, conf)
        wall, states = self._wait(runs, 3600, sample=True)
        wall = time.perf_counter() - t0
        self.figures["wall_s"] = round(wall, 1)
        self.figures["dag_run_states"] = states
        durations: list[float] = []
        for dag_id, run_id in runs.items():
            r = self.client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                                params={"task_id_pattern": "score_batch", "limit": 1000})
            for ti in r.json().get("task_instances", []):
                if ti.get("task_id") == "score_batch" and ti.get("duration") is not None:
                    durations.append(float(ti["duration"]))
        self.figures["batches"] = len(durations)
        self.figures["batch_p50_s"] = round(loadgen.percentile(durations, 50), 2)
        self.figures["batch_p95_s"] = round(loadgen.percentile(durations, 95), 2)
        with psycopg.connect(self.dsn) as conn:
            self.figures["users_processed"] = int(_scalar(
                conn, "SELECT coalesce(sum(users_processed), 0) FROM overnight_job_runs WHERE session_date = %s",
                (self.session,)))
            self.figures["users_failed"] = int(_scalar(
                conn, "SELECT coalesce(sum(users_failed), 0) FROM overnight_job_runs WHERE session_date = %s",
                (self.session,)))
            self.figures["events_written"] = _scalar(  # the view's rows, counted without building them
                conn, "SELECT coalesce(sum(json_array_length(u)), 0) FROM calculation_chunks c,"
                      " json_array_elements(c.events) u")
            self.figures["documents_written"] = _scalar(conn, "SELECT count(*) FROM recommendations")
            job_ids = [str(r[0]) for r in conn.execute("SELECT id FROM overnight_job_runs WHERE session_date = %s",
                                                       (self.session,))]
            self.figures.update(audit_size(conn, job_ids))
        rc = redis.Redis.from_url(self.redis_url)  # each kind of key counted, not one inferred from the other
        recs = sum(1 for _ in rc.scan_iter(f"{cache.RECS_PREFIX}*", count=10_000))
        portfolios = sum(1 for _ in rc.scan_iter(f"{cache.PORTFOLIO_PREFIX}*", count=10_000))
        self.figures["redis_recs_keys"], self.figures["redis_portfolio_keys"] = recs, portfolios
        self.figures["redis_keys"] = recs + portfolios
        self.figures["users_per_s"] = round(self.figures["users_processed"] / wall, 1) if wall else 0

    # ------------------------------------------------------------------ floors

    def run_io_floor(self) -> None:
        """COPY the same rows into scratch tables and pipeline the same documents into Redis.

        Streams: before the timed part each source of `FLOOR_TABLES` is dumped with COPY TO STDOUT, and the
        documents (`FLOOR_DOCUMENTS`, through a server-side cursor) as length-prefixed records, into files
        under the run's home; the timed part (`floor_io_s`, the same work as when it held them in memory:
        the COPYs into the scratch tables and the Redis SETs) reads each file in blocks of `FLOOR_BLOCK`
        and sends the documents in pipelines of `FLOOR_PIPELINE` users. The bench process's peak RSS: 182 MB
        at 20,000 users and at 200,000; was 490 MB and 3,629 MB (every row held twice, and the documents as
        Python tuples: 17.8 GB at 1 M users)."""
        dumps = self.floor_dump()
        t0 = time.perf_counter()
        self.floor_load(dumps)
        self.figures["floor_io_s"] = round(time.perf_counter() - t0, 1)
        self.floor_clean()

    def floor_dump(self) -> list[Path]:
        """The I/O floor's untimed part: creates the scratch tables and dumps each source of `FLOOR_TABLES`
        (COPY TO STDOUT) and the documents (length-prefixed records) into files; returns the files (one per
        table, then the documents')."""
        floor = self.home / "io-floor"
        floor.mkdir(parents=True, exist_ok=True)
        dumps = [floor / f"{scratch}.copy" for _, scratch in FLOOR_TABLES]
        docs = floor / "documents.bin"
        with psycopg.connect(self.dsn) as conn:
            for (source, scratch), path in zip(FLOOR_TABLES, dumps, strict=True):
                conn.execute(f"CREATE TABLE {scratch} (LIKE {source} INCLUDING ALL)")
                with conn.cursor().copy(f"COPY (SELECT * FROM {source}) TO STDOUT") as cp, \
                        path.open("wb", buffering=FLOOR_BLOCK) as f:
                    for chunk in cp:
                        f.write(chunk)
            conn.commit()
            with conn.cursor(name="bench_floor_documents") as cur, docs.open("wb", buffering=FLOOR_BLOCK) as f:
                cur.itersize = FLOOR_PIPELINE
                cur.execute(FLOOR_DOCUMENTS)
                for row in cur:
                    parts = [str(v).encode() for v in row]
                    f.write(_DOC_HEADER.pack(*map(len, parts)))
                    f.write(b"".join(parts))
            conn.commit()
        return [*dumps, docs]

    def floor_load(self, dumps: list[Path]) -> None:
        """The I/O floor's timed part: COPYs each table's dump into its scratch table, a block at a time, then
        SETs each user's two documents in Redis, `FLOOR_PIPELINE` users a send."""
        *tables, docs = dumps
        with psycopg.connect(self.dsn) as conn:
            for (_, scratch), path in zip(FLOOR_TABLES, tables, strict=True):
                with conn.cursor().copy(f"COPY {scratch} FROM STDIN") as cp, path.open("rb", buffering=0) as f:
                    while block := f.read(FLOOR_BLOCK):
                        cp.write(block)
        rc = redis.Redis.from_url(self.redis_url)
        with docs.open("rb", buffering=FLOOR_BLOCK) as src:  # packed and sent as the night's warm does (`cache.warm`)

            def commands() -> Iterator[bytes]:
                while header := src.read(_DOC_HEADER.size):
                    n_uid, n_doc, n_port = _DOC_HEADER.unpack(header)
                    uid, doc, port = src.read(n_uid), src.read(n_doc), src.read(n_port)
                    yield cache.packed_set(b"benchfloor:recs:" + uid, doc, 86400)
                    yield cache.packed_set(b"benchfloor:portfolio:" + uid, port, 86400)

            cache.send_chunked(rc, commands(), 2 * FLOOR_PIPELINE)

    def floor_clean(self) -> None:
        """Removes the I/O floor's files, Redis keys and scratch tables."""
        shutil.rmtree(self.home / "io-floor", ignore_errors=True)
        rc = redis.Redis.from_url(self.redis_url)
        for keys in _batched(rc.scan_iter("benchfloor:*", count=10_000), 10_000):
            rc.delete(*keys)
        with psycopg.connect(self.dsn) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {', '.join(scratch for _, scratch in FLOOR_TABLES)}")

    # ------------------------------------------------------------------ dashboard

    def run_api(self, seconds: float = 20.0, clients: int = 8, rounds: int | None = None,
                quiet_wait_s: float = 90.0) -> None:
        """p50/p99 of cache hits, misses and a no-op route, `clients` concurrent for `seconds` each.

        The clients are `overnight.dev.loadgen` (asyncio, keep-alive) in a process of their own, so the
        figures are the api-server's, not the Python HTTP client's; they send httpx's default headers
        (gzip accepted, as a browser does) with the token. The cases take turns in `rounds` slices of
        `seconds / rounds` (hit, miss, no-op, hit, ...), each on new connections, and each case's
        percentiles are over all its slices: a drift of the machine's speed during the measurement
        then weighs on every case alike, and so does the kernel's split of the connections between
        api-server workers. That split moves one slice's rate by up to a third (4 + 4 connections or
        6 + 2), so the default is as many slices as keep each at least 2 s long, at most 10. Before it, it
        waits up to `quiet_wait_s` for the machine to be quiet (0: not at all, as the test suite runs it
        beside other tests).
        """
        rounds = rounds or max(1, min(10, int(seconds // 2)))
        with psycopg.connect(self.dsn) as conn:
            ids = [str(r[0]) for r in conn.execute("SELECT user_id FROM recommendations ORDER BY user_id LIMIT 400")]
        if len(ids) < 20:
            return
        hit, miss = ids[: len(ids) // 2], ids[len(ids) // 2 :]
        rc = redis.Redis.from_url(self.redis_url)
        rc.delete(*[f"recs:{u}" for u in miss])
        headers = dict(self.client.headers)
        base = f"http://127.0.0.1:{self.port}/overnight/api/v1"
        cases = {"hit": [f"{base}/dashboard/{u}" for u in hit], "miss": [f"{base}/dashboard/{u}" for u in miss],
                 "noop": [f"{base}/ping"]}
        self._vacuum()
        self.figures["api_quiet_wait_s"] = _wait_quiet(max_s=quiet_wait_s)
        api_log = self.home / "logs-components" / "api-server.log"
        log_start = api_log.stat().st_size if api_log.exists() else 0
        self.figures["api_rounds"] = rounds
        latencies: dict[str, list[float]] = {name: [] for name in cases}
        elapsed = dict.fromkeys(cases, 0.0)
        errors = dict.fromkeys(cases, 0)
        slices: dict[str, list[float]] = {name: [] for name in cases}
        with self.sampling("api_cpu_s_by_process"):
            for _ in range(rounds):
                for name, urls in cases.items():
                    result = loadgen.run_in_subprocess(urls, headers, clients=clients, seconds=seconds / rounds,
                                                       latencies=True)
                    latencies[name] += result["latencies_ms"]
                    elapsed[name] += result["elapsed_s"]
                    errors[name] += result["errors"]
                    slices[name].append(round(len(result["latencies_ms"]) / result["elapsed_s"], 1)
                                        if result["elapsed_s"] else 0.0)
        self.figures["api_rps_by_slice"] = slices  # the spread between slices: how far one figure can be trusted
        if api_log.exists():  # answers from Postgres because a Redis reply was late, or Redis failed (5 s)
            with api_log.open("rb") as f:
                f.seek(log_start)
                text = f.read()
            self.figures["api_redis_late"] = text.count(b"dashboard: a Redis reply took over")
            self.figures["api_redis_fallbacks"] = text.count(b"dashboard: Redis unavailable")
        for name in cases:
            self.figures[f"api_{name}_p50_ms"] = round(loadgen.percentile(latencies[name], 50), 2)
            self.figures[f"api_{name}_p99_ms"] = round(loadgen.percentile(latencies[name], 99), 2)
            self.figures[f"api_{name}_rps"] = round(len(latencies[name]) / elapsed[name], 1) if elapsed[name] else 0.0
            self.figures[f"api_{name}_errors"] = errors[name]
        if self.figures.get("api_noop_rps"):
            self.figures["api_hit_vs_noop_throughput"] = round(
                self.figures["api_hit_rps"] / self.figures["api_noop_rps"], 2)

    def _vacuum(self) -> None:
        """VACUUM ANALYZE of the run's two databases: what autovacuum does in the hours between the night's
        run and the day's logins, done before the dashboard is measured rather than during it."""
        t0 = time.perf_counter()
        meta = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://", 1)
        for dsn in (self.dsn, meta):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
        self.figures["api_vacuum_s"] = round(time.perf_counter() - t0, 1)

    # ------------------------------------------------------------------ tear-down

    def stop(self, keep: bool) -> None:
        """Stops the processes; drops the databases unless `keep`."""
        for proc in self.procs.values():
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if keep:
            return
        admin = postgres_dsn(self.base, dbname="postgres")
        with suppress(psycopg.Error), psycopg.connect(admin, autocommit=True) as conn:
            for name in (self.app_db, self.meta_db):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with suppress(redis.RedisError):
            redis.Redis.from_url(self.redis_url).flushdb()
        shutil.rmtree(self.home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: the benchmark; prints figures and, last, one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--executor", choices=["local", "celery"], default="local")
    parser.add_argument("--batch-size", type=int, default=10_000, help="users per mapped task (default 10000)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--api-seconds", type=float, default=20.0)
    parser.add_argument("--quiet-wait", type=float, default=90.0,
                        help="seconds at most to wait for a quiet machine before the dashboard is measured (default 90)")
    parser.add_argument("--api-workers", type=int, default=2,
                        help="api-server worker processes (default 2, one per core; see docs/benchmarks.md)")
    parser.add_argument("--parallelism", type=int, default=4,
                        help="Airflow task slots (AIRFLOW__CORE__PARALLELISM; default 4: two per core, since a slot "
                             "also waits on task start-up and Postgres)")
    parser.add_argument("--keep", action="store_true", help="keep the databases and Airflow home afterwards")
    args = parser.parse_args(argv)
    devenv.private_umask()  # its Airflow home, component and task logs under .local: the owner's only
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops its Airflow
    bench = Bench(args.users, args.executor, args.batch_size, args.seed, None, api_workers=args.api_workers,
                  parallelism=args.parallelism)
    try:
        bench.prepare()
        bench.seed()
        print(f"bench {bench.id}: seeded {args.users:,} users in {bench.figures['seed_s']} s; session "
              f"{bench.session}; executor {args.executor}", flush=True)
        bench.figures["calibration_s"] = calibration_s()
        bench.start_airflow()
        bench.run_noop()
        print(f"orchestration floor: {bench.figures['floor_orch_s']} s", flush=True)
        bench.run_markets()
        print(f"markets: {bench.figures['wall_s']} s wall, {bench.figures['users_per_s']} users/s, "
              f"batches p50 {bench.figures['batch_p50_s']} s p95 {bench.figures['batch_p95_s']} s", flush=True)
        bench.run_io_floor()
        print(f"I/O floor: {bench.figures['floor_io_s']} s", flush=True)
        if args.api_seconds > 0:
            bench.run_api(args.api_seconds, quiet_wait_s=args.quiet_wait)
    finally:
        bench.stop(args.keep)
    f = bench.figures
    f.update(self_peak_rss_mb())  # after stop(): its children waited for
    floors = f.get("floor_io_s", 0) + f.get("floor_orch_s", 0)
    f["wall_vs_floors"] = round(f["wall_s"] / floors, 2) if floors else None
    print(json.dumps(f, sort_keys=True))
    ok = f.get("users_failed", 1) == 0 and set(f.get("dag_run_states", {}).values()) == {"success"}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
