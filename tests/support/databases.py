"""The test run's databases on the test server: made by cloning templates built once per suite run.

A suite run (one `pytest`, with or without xdist workers) has an id, `OVERNIGHT_TEST_SUITE_ID`; each of its
processes a run id of its own (`OVERNIGHT_TEST_RUN_ID`), which names its databases (`ovt_<run id>...`).
What takes long to make, the migrated application database (seeded or not) and Airflow's migrated metadata
database, is built once per suite run as a template (`ovt_<suite id>_t_<kind>`) by whichever process asks
first (an advisory lock keeps the others waiting), then cloned with `CREATE DATABASE ... TEMPLATE`, a file
copy that takes well under a second. A finished template refuses connections (`ALLOW_CONNECTIONS false`):
Postgres clones a database only while nobody is connected to it. The suite's first process drops them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from airflow.sdk import Connection
from psycopg import sql

from overnight.adapters.connections import POSTGRES_CONN_ID, from_value, postgres_dsn

ROOT = Path(__file__).resolve().parents[2]
SEEDED_USERS, SEED = 600, 7  # the shared data set of the `seeded` fixture


def server() -> Connection:
    """The test run's `overnight_postgres` connection (its database: this process's application database)."""
    return from_value(POSTGRES_CONN_ID, os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])


def dsn_of(name: str) -> str:
    """The DSN of database `name` on the test server."""
    return postgres_dsn(server(), dbname=name)


def _admin() -> psycopg.Connection:
    return psycopg.connect(dsn_of("postgres"), autocommit=True, connect_timeout=10)


def drop(name: str) -> None:
    """Drops database `name` (any session still on it is ended)."""
    with _admin() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def drop_like(prefix: str) -> None:
    """Drops every database whose name starts with `prefix`."""
    with _admin() as c:
        names = [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))]
    for name in names:
        drop(name)


def create(name: str) -> str:
    """Creates the empty database `name` (replacing any left behind); returns its DSN."""
    drop(name)
    with _admin() as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return dsn_of(name)


def clone(template: str, name: str) -> str:
    """Creates database `name` as a copy of `template` (replacing any `name` left behind); returns its DSN."""
    drop(name)
    with _admin() as c:
        for attempt in range(20):  # a session of the template's builder may take a moment to end
            try:
                c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                           sql.Identifier(template)))
                break
            except psycopg.errors.ObjectInUse:
                if attempt == 19:
                    raise
                time.sleep(0.5)
    return dsn_of(name)


def template(kind: str, build: Callable[[str], str | None]) -> str:
    """The suite run's template `kind`, built by `build(dsn)` the first time any process asks; returns its name.

    What `build` returns is kept as the database's comment (`note`), for every process to read."""
    name = f"ovt_{os.environ['OVERNIGHT_TEST_SUITE_ID']}_t_{kind}"
    with _admin() as c:
        c.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
        try:
            ready = c.execute("SELECT 1 FROM pg_database WHERE datname = %s AND NOT datallowconn", (name,)).fetchone()
            if not ready:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                note = build(dsn_of(name))
                if note is not None:
                    c.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(note)))
                c.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
                c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        finally:
            c.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))
    return name


def note(name: str) -> str | None:
    """What the template's `build` returned."""
    with _admin() as c:
        row = c.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                        (name,)).fetchone()
    return row[0] if row else None


def app_template(users: int = 0, seed_value: int = SEED) -> str:
    """The migrated application database, with `users` synthetic users of seed `seed_value` when `users`
    (its note: the seeder's row counts, as JSON)."""
    def build(dsn: str) -> str | None:
        from overnight.adapters import migrate
        from overnight.dev import seed

        migrate.migrate(dsn)
        if not users:
            return None
        with psycopg.connect(dsn) as c:
            return json.dumps(seed.seed(c, users, seed_value, dsn=dsn))

    return template(f"app_{users}_{seed_value}" if users else "app", build)


def airflow_template() -> str:
    """Airflow's metadata database after `airflow db migrate` and `airflow pools import include/pools.json`
    (the two commands a deployment runs: docs/deploy.md)."""
    def build(dsn: str) -> None:
        env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": dsn.replace("postgresql://",
                                                                                "postgresql+psycopg2://", 1)}
        airflow = str(Path(sys.executable).with_name("airflow"))
        for args in (["db", "migrate"], ["pools", "import", str(ROOT / "include" / "pools.json")]):
            proc = subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=600,
                                  cwd=str(ROOT))
            assert proc.returncode == 0, f"airflow {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"

    return template("af", build)
