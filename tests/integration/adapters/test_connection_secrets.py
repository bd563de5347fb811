"""No password in any message: hostile connection values (passwords holding / ? # @ :, raw and percent-encoded,
URI and Airflow's JSON form with extras, a value with no scheme) go through every path that reads a
connection and can fail: Airflow's parsing (through `from_value` and `get_connection`), preflight's checks, the dev environment's checks, the night's Postgres
and Redis clients, the dashboard's store and Redis client. Every exception (its text, repr and traceback,
chained causes included) and every log line they produce is scanned for the password and for each of its
pieces, so a message that quotes part of it (urlsplit's port error on an unencoded `/`) fails too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from airflow.sdk import Connection

from overnight.adapters import cache, db
from overnight.adapters.connections import (
    POSTGRES_CONN_ID,
    REDIS_CONN_ID,
    ConnectionNotConfigured,
    from_value,
    get_connection,
    postgres_dsn,
    redacted,
    redis_url,
)
from overnight.dashboard.redis_get import RedisGet
from overnight.dashboard.store import DashboardStore
from overnight.ops import preflight
from tests.support.ports import free_port

# pieces long and unique enough that finding one anywhere can only be a leak
PIECES = [f"{word}{uuid.uuid4().hex[:6]}" for word in ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot")]
PASSWORD = f"{PIECES[0]}/{PIECES[1]}?{PIECES[2]}#{PIECES[3]}@{PIECES[4]}:{PIECES[5]}"
SINGLES = {c: f"{PIECES[0]}{c}{PIECES[1]}" for c in "/?#@:"}  # one special character each


def _needles() -> list[str]:
    out = set(PIECES)
    for pw in [PASSWORD, *SINGLES.values()]:
        out |= {pw, quote(pw, safe=""), quote(pw)}
    return sorted(out)


def _cases(port: int) -> dict[str, tuple[str, str]]:
    """name -> (conn id, value): every form a deployment may give, the password raw or encoded."""
    pg, rd = POSTGRES_CONN_ID, REDIS_CONN_ID
    cases: dict[str, tuple[str, str]] = {}
    for name, pw in {"all": PASSWORD, **{f"char{ord(c)}": v for c, v in SINGLES.items()}}.items():
        cases[f"pg-uri-raw-{name}"] = (pg, f"postgresql://app:{pw}@127.0.0.1:{port}/overnight")
        cases[f"pg-uri-encoded-{name}"] = (pg, f"postgresql://app:{quote(pw, safe='')}@127.0.0.1:{port}/overnight")
        cases[f"redis-uri-raw-{name}"] = (rd, f"redis://:{pw}@127.0.0.1:{port}/0")
        cases[f"redis-uri-encoded-{name}"] = (rd, f"redis://user:{quote(pw, safe='')}@127.0.0.1:{port}/0")
    cases["pg-no-scheme"] = (pg, f"//app:{PASSWORD}@db:5432/overnight")
    cases["pg-json-extras"] = (pg, json.dumps({
        "conn_type": "postgres", "host": "127.0.0.1", "port": port, "login": "app", "password": PASSWORD,
        "schema": "overnight", "extra": {"sslmode": "disable", "sslpassword": PASSWORD}}))
    cases["pg-json-extra-as-bad-text"] = (pg, json.dumps({
        "conn_type": "postgres", "host": "127.0.0.1", "login": "app", "password": PASSWORD,
        "extra": '{"sslpassword": "' + PASSWORD + '"'}))
    cases["pg-json-bad-port"] = (pg, json.dumps({"conn_type": "postgres", "host": "h", "port": PASSWORD,
                                                 "password": PASSWORD}))
    cases["pg-json-broken"] = (pg, '{"conn_type": "postgres", "password": "' + PASSWORD + '", ')
    cases["redis-json"] = (rd, json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": port,
                                           "password": PASSWORD, "extra": {"db": "0"}}))
    return cases


def _attempts(conn_id: str, value: str) -> list[tuple[str, Callable[[], Any]]]:
    """Everything that reads the connection and reports on it."""
    def info() -> Any:
        return from_value(conn_id, value)

    out: list[tuple[str, Callable[[], Any]]] = [
        ("parse", info),
        ("redacted", lambda: redacted(info())),
        ("get_connection", lambda: get_connection(conn_id)),
    ]
    if conn_id == POSTGRES_CONN_ID:
        out += [
            ("preflight", lambda: preflight.check_postgres(timeout_s=1)),
            ("devenv", lambda: __import__("overnight.dev.devenv").dev.devenv.check_postgres(info(), create=False)),
            ("night", lambda: db.connect().close()),
            ("store-repr", lambda: repr(DashboardStore(pg_dsn=postgres_dsn(info()), redis_url=""))),
            ("store", lambda: asyncio.run(_store_read(pg_dsn=postgres_dsn(info()), redis_url=""))),
        ]
    else:
        out += [
            ("preflight", lambda: preflight.check_redis(timeout_s=1)),
            ("devenv", lambda: __import__("overnight.dev.devenv").dev.devenv.check_redis(info())),
            ("night", lambda: cache.connect(timeout_s=1).ping()),
            ("redis-get-raw", lambda: RedisGet(value)),
            ("redis-get", lambda: asyncio.run(RedisGet(redis_url(info()), 0.5).get("recs:x"))),
        ]
    return out


async def _store_read(**kwargs: Any) -> Any:
    store = DashboardStore(**kwargs)
    try:
        return await store.job_runs(limit=1)
    finally:
        await store.aclose()


def _texts(result: Any, exc: BaseException | None) -> list[str]:
    # Airflow's Connection holds the password by design (its masker hides it in task logs, and from_value and
    # get_connection register it there): what this package makes of it, and every error, must not show it.
    texts = [] if isinstance(result, Connection) else [repr(result), str(result)]
    if exc is not None:
        texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    return texts


@pytest.mark.parametrize("case", sorted(_cases(1)))
def test_no_message_or_log_line_shows_any_part_of_the_password(case: str, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    conn_id, value = _cases(free_port())[case]  # nothing listens there: every reach fails
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)
    caplog.set_level(logging.DEBUG)
    needles = _needles()
    seen: dict[str, list[str]] = {}
    failed = 0
    for name, attempt in _attempts(conn_id, value):
        result, error = None, None
        try:
            result = attempt()
        except Exception as exc:  # noqa: BLE001 - every failure's text is what is scanned
            error = exc
            failed += 1
        seen[name] = _texts(result, error)
        if name == "parse" and error is not None:  # an unusable value: the error says what and where
            assert isinstance(error, ConnectionNotConfigured), repr(error)
            assert f"AIRFLOW_CONN_{conn_id.upper()}" in str(error), str(error)
    logged = [caplog.handler.format(r) for r in caplog.records]
    leaks = {name: [n for n in needles if any(n in t for t in texts)] for name, texts in seen.items()}
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, f"{case}: the password shows in {leaks}"
    assert not [line for line in logged if any(n in line for n in needles)], f"{case}: in a log line"
    assert failed, f"{case}: nothing failed, so nothing was scanned"  # every case reaches a closed port or is refused
