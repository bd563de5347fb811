"""Test set-up: every run gets fresh databases and a Redis database of its own, on the real servers.

The servers are the ones the `overnight_postgres` / `overnight_redis` connections point at (the
machine's, or the embedded ones `make test` starts). This module sets the environment before
anything imports Airflow, so Airflow's metadata database is fresh too.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

import pytest  # noqa: E402

from overnight.adapters.connections import POSTGRES_CONN_ID, ConnInfo, parse_connection, postgres_dsn  # noqa: E402
from overnight.dev import devenv  # noqa: E402

pytest_plugins = ["tests.support.fixtures_provider"]

RUN_ID = uuid.uuid4().hex[:10]


def _prepare_environment() -> dict[str, str]:
    if not os.environ.get("AIRFLOW_CONN_OVERNIGHT_POSTGRES") or not os.environ.get("AIRFLOW_CONN_OVERNIGHT_REDIS"):
        os.environ.update(devenv.environment())  # started outside make: bring the servers up
    base = parse_connection(POSTGRES_CONN_ID, os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
    app_db, meta_db = f"ovt_{RUN_ID}", f"ovt_{RUN_ID}_af"
    for name in (app_db, meta_db):
        devenv.create_database(base, name)
    app = ConnInfo(**{**base.__dict__, "schema": app_db})
    meta = ConnInfo(**{**base.__dict__, "schema": meta_db})
    redis_test_url = devenv.pick_redis_db(os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"], f"test-{RUN_ID}")
    home = ROOT / ".local" / f"test-{RUN_ID}"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRFLOW_CONN_OVERNIGHT_POSTGRES": postgres_dsn(app),
        "AIRFLOW_CONN_OVERNIGHT_REDIS": redis_test_url,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_dsn(meta).replace("postgresql://", "postgresql+psycopg2://", 1),
        "AIRFLOW_CONN_OVERNIGHT_AIRFLOW_METADATA": postgres_dsn(meta),  # overnight_metadata_cleanup's database
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "OVERNIGHT_CACHE_DIR": str(home / "cache"),  # the session table (overnight.domain.sessions) of this run only
        "OVERNIGHT_TEST_REDIS_URL": redis_test_url,
        "OVERNIGHT_TEST_RUN_ID": RUN_ID,
    }
    os.environ.update(env)
    return env


TEST_ENV = _prepare_environment()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drops this run's databases and flushes its Redis database (kept with OVERNIGHT_KEEP_TEST_DATA=1)."""
    if os.environ.get("OVERNIGHT_KEEP_TEST_DATA"):
        return
    import psycopg
    import redis

    if "airflow.settings" in sys.modules:
        sys.modules["airflow.settings"].dispose_orm()
    base = parse_connection(POSTGRES_CONN_ID, TEST_ENV["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
    admin = ConnInfo(**{**base.__dict__, "schema": "postgres"})
    try:
        with psycopg.connect(postgres_dsn(admin), autocommit=True) as conn:
            for name in (f"ovt_{RUN_ID}", f"ovt_{RUN_ID}_af"):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        client = redis.Redis.from_url(TEST_ENV["AIRFLOW_CONN_OVERNIGHT_REDIS"])
        client.flushdb()
    except Exception as exc:  # noqa: BLE001 - clean-up must not mask the test result
        print(f"test clean-up incomplete: {exc}")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The migrated application database of this test run."""
    from overnight.adapters import migrate

    dsn = TEST_ENV["AIRFLOW_CONN_OVERNIGHT_POSTGRES"]
    migrate.migrate(dsn)
    return dsn


@pytest.fixture
def conn(pg_dsn: str):
    """A connection to this run's application database."""
    import psycopg

    with psycopg.connect(pg_dsn) as c:
        yield c


@pytest.fixture
def redis_client():
    """A client of this run's Redis database."""
    import redis

    client = redis.Redis.from_url(TEST_ENV["AIRFLOW_CONN_OVERNIGHT_REDIS"])
    yield client
    client.close()


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata database of this run, migrated (once per run)."""
    from overnight.dev import airflow_setup

    airflow_setup.migrate_metadata()
    airflow_setup.write_passwords()
    airflow_setup.protect_airflow_files()


@pytest.fixture(scope="session")
def seeded(pg_dsn: str) -> dict[str, int]:
    """600 synthetic users (seed 7) in this run's database."""
    import psycopg

    from overnight.dev import seed

    with psycopg.connect(pg_dsn) as c:
        counts = seed.seed(c, 600, 7, dsn=pg_dsn)
    return counts


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Measurements (`@pytest.mark.measurement`: timings to read, not behaviour to check; speed targets live in
    `make bench`) are left out unless OVERNIGHT_MEASURE_LATENCY=1 asks for them: deselected, never skipped."""
    if os.environ.get("OVERNIGHT_MEASURE_LATENCY"):
        return
    left_out = [item for item in items if item.get_closest_marker("measurement")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("measurement")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI (`CI` set, as `.ci/run` runs) a skipped test fails, naming why and what to install: CI runs them all."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("CI")) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    fix = ("install it: apt-get update && apt-get install -y chromium (README, 'The two commands')"
           if "chromium" in reason.lower() else "give the test what it needs on the CI machine")
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every test must run: {reason}\nTo fix: {fix}"
