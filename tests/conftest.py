"""Test set-up: every run gets fresh databases and a Redis database of its own, on the real servers.

The servers are the ones the `overnight_postgres` / `overnight_redis` connections point at (the
machine's, or the embedded ones `make test` starts). This module sets the environment before
anything imports Airflow, so Airflow's metadata database is fresh too.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from overnight.dev import devenv

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.support.fixtures_provider"]

# A suite run is one `pytest`; with xdist each worker is a process of it with databases of its own.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... in an xdist worker
if not WORKER:
    os.environ["OVERNIGHT_TEST_SUITE_ID"] = uuid.uuid4().hex[:10]
    os.environ["OVERNIGHT_TEST_SUITE_STARTED"] = str(time.time())  # what this suite run wrote under .local: newer
SUITE_ID = os.environ["OVERNIGHT_TEST_SUITE_ID"]
RUN_ID = f"{SUITE_ID}{WORKER.replace('gw', 'w')}"
TEST_ENV: dict[str, str] = {}


def _prepare_environment() -> dict[str, str]:
    # Nothing here imports Airflow (its settings are read once, at its import): the URIs `make` wrote (.local/env.sh)
    # get this run's database names by hand.
    base = os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"]

    def on(database: str) -> str:
        return urlunsplit(urlsplit(base)._replace(path=f"/{database}"))

    app_db, meta_db = f"ovt_{RUN_ID}", f"ovt_{RUN_ID}_af"
    redis_test_url = devenv.pick_redis_db(os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"], f"test-{RUN_ID}")
    home = ROOT / ".local" / f"test-{RUN_ID}"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRFLOW_CONN_OVERNIGHT_POSTGRES": on(app_db),
        "AIRFLOW_CONN_OVERNIGHT_REDIS": redis_test_url,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": on(meta_db).replace("postgresql://", "postgresql+psycopg2://", 1),
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
    # The application database: a clone of the migrated template with the shared data set (the `seeded`
    # fixture's 600 users, seed 7); Airflow's metadata database is cloned when a test asks (`airflow_db`).
    from tests.support import databases

    databases.clone(databases.app_template(databases.SEEDED_USERS, databases.SEED), app_db)
    databases.drop(meta_db)
    return env


def _xdist_controller(config: pytest.Config) -> bool:
    """Whether this process only hands tests to xdist workers (it runs none: it needs no databases)."""
    distributes = bool(getattr(config.option, "numprocesses", None)) and getattr(config.option, "dist", "no") != "no"
    return distributes and not config.option.collectonly and not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """Sets the environment before any test module imports Airflow (collection comes after)."""
    if not os.environ.get("AIRFLOW_CONN_OVERNIGHT_POSTGRES") or not os.environ.get("AIRFLOW_CONN_OVERNIGHT_REDIS"):
        os.environ.update(devenv.environment())  # started outside make: bring the servers up (workers inherit them)
    if not _xdist_controller(config):
        TEST_ENV.update(_prepare_environment())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drops this process's databases and flushes its Redis database; the suite's first process drops what is
    left of the suite run (its templates). All kept with OVERNIGHT_KEEP_TEST_DATA=1."""
    if os.environ.get("OVERNIGHT_KEEP_TEST_DATA"):
        return
    import redis

    from tests.support import databases

    if "airflow.settings" in sys.modules:
        sys.modules["airflow.settings"].dispose_orm()
    try:
        if TEST_ENV:
            for name in (f"ovt_{RUN_ID}", f"ovt_{RUN_ID}_af"):
                databases.drop(name)
            client = redis.Redis.from_url(TEST_ENV["AIRFLOW_CONN_OVERNIGHT_REDIS"])
            client.flushdb()
        if not WORKER:
            databases.drop_like(f"ovt_{SUITE_ID}")
    except Exception as exc:  # noqa: BLE001 - clean-up must not mask the test result
        print(f"test clean-up incomplete: {exc}")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """This process's application database: migrated, with the shared data set (see `seeded`)."""
    return TEST_ENV["AIRFLOW_CONN_OVERNIGHT_POSTGRES"]


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
    """Airflow's metadata database of this process, migrated (a clone of the suite run's template)."""
    from overnight.dev import airflow_setup
    from tests.support import databases

    databases.clone(databases.airflow_template(), f"ovt_{RUN_ID}_af")
    airflow_setup.write_private(airflow_setup.migrated_marker(), "ok\n")  # the clone is migrated: no second migrate
    airflow_setup.write_passwords()
    airflow_setup.protect_airflow_files()


@pytest.fixture(scope="session")
def seeded(pg_dsn: str) -> dict[str, int]:
    """The shared data set in this process's database: 600 synthetic users (seed 7), from the template.

    Tests that change it put it back (`seed.seed(conn, 600, 7)`); returns the row count of each table."""
    import json

    from tests.support import databases

    return json.loads(databases.note(databases.app_template(databases.SEEDED_USERS, databases.SEED)) or "{}")


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (`make test`: PYTEST_WORKERS) each module's tests go to one worker (`--dist loadfile`: its
    module-scoped servers and data are made once); the modules with a slow test go first, so that the longest
    tests do not start last (`--no-loadscope-reorder` keeps this order: xdist would send the modules with the
    most tests first, and the slow ones, which have few, last).

    Measurements (`@pytest.mark.measurement`: timings to read, not behaviour to check; speed targets live in
    `make bench`) are left out unless OVERNIGHT_MEASURE_LATENCY=1 asks for them: deselected, never skipped."""
    slow = {_module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _module(item) not in slow)  # stable: the order within stays
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
