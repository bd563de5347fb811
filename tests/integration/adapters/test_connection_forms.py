"""Every standard form of an Airflow connection works end to end, because Airflow parses it (issue 23):
a URI, a URI with `?__extra__=`, Airflow's JSON form with extras, and a host that carries its protocol.

The oracle is the server at the other end: Postgres says which `application_name` and database the session
has, Redis which database a key landed in, the provider's HTTP server which path and key it was asked with.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote, urlsplit

import pytest
import redis

from overnight.adapters import cache, connections, db
from overnight.night import runtime
from tests.support.fake_provider import FakeProviderServer


def _pg_parts() -> dict[str, object]:
    """This test run's application database, as the parts a JSON connection names."""
    import os

    parts = urlsplit(os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
    return {"host": parts.hostname, "port": parts.port, "login": parts.username, "password": parts.password,
            "schema": parts.path.lstrip("/")}


def _session(monkeypatch: pytest.MonkeyPatch, value: str) -> tuple[str, str]:
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", value)
    with db.connect() as conn:  # through PostgresHook
        name, database = conn.execute("SELECT current_setting('application_name'), current_database()").fetchone()
    return str(name), str(database)


def test_postgres_json_form_with_extras_reaches_libpq(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _pg_parts()
    value = json.dumps({"conn_type": "postgres", **{k: v for k, v in parts.items() if v is not None},
                        "extra": {"application_name": "forms-json", "sslmode": "disable", "connect_timeout": 3}})
    assert _session(monkeypatch, value) == ("forms-json", parts["schema"])


def test_postgres_uri_with_airflows_extra_parameter(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _pg_parts()
    auth = f"{parts['login']}{':' + quote(str(parts['password']), safe='') if parts['password'] else ''}@" \
        if parts["login"] else ""
    extra = quote(json.dumps({"application_name": "forms-extra"}), safe="")
    value = f"postgresql://{auth}{parts['host']}:{parts['port']}/{parts['schema']}?__extra__={extra}"
    assert _session(monkeypatch, value) == ("forms-extra", parts["schema"])
    # without extras the package's own name, so its sessions are told apart in pg_stat_activity
    assert _session(monkeypatch, value.split("?")[0]) == ("overnight", parts["schema"])


def test_redis_json_form_with_the_db_extra(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = redis_client.connection_pool.connection_kwargs
    other = 3 if kwargs.get("db") != 3 else 4
    value = json.dumps({"conn_type": "redis", "host": kwargs["host"], "port": kwargs["port"],
                        **({"password": kwargs["password"]} if kwargs.get("password") else {}),
                        "extra": {"db": other}})
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_REDIS", value)
    key = f"forms-test:{uuid.uuid4().hex}"
    client = cache.connect()
    try:
        client.set(key, "x", ex=60)
    finally:
        client.close()
    there = redis.Redis(host=kwargs["host"], port=kwargs["port"], password=kwargs.get("password"), db=other)
    try:
        assert there.get(key) == b"x" and redis_client.get(key) is None
        there.delete(key)
    finally:
        there.close()


@pytest.mark.parametrize("form", ["uri-host-with-protocol", "json-host-with-protocol", "json-scheme-extra"])
def test_http_provider_host_with_protocol(form: str, fake_provider: FakeProviderServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    port = urlsplit(fake_provider.base_url).port
    key = f"k{uuid.uuid4().hex[:8]}"
    value = {
        # Airflow's URI form for a host that has a protocol, percent-encoded (the raw `http://http://...` Airflow
        # refuses when the protocol repeats the connection type); this form takes no credentials
        "uri-host-with-protocol": f"http://http%3A%2F%2F127.0.0.1:{port}",
        "json-host-with-protocol": json.dumps({"conn_type": "http", "host": f"http://127.0.0.1:{port}",
                                               "password": key}),
        "json-scheme-extra": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port,
                                         "extra": {"scheme": "http", "api_key": key}}),
    }[form]
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", value)
    key = None if form.startswith("uri") else key
    assert runtime._http_conn(runtime.RATES_CONN_ID) == (f"http://127.0.0.1:{port}", key)
    provider = runtime.rates_provider(None)
    try:
        snapshot = provider.fetch_rates("USD", ["EUR"])
    finally:
        close = getattr(provider, "close", None)
        if close:
            close()
    assert snapshot.rates  # answered from the fake provider's ECB table
    [request] = fake_provider.requests_for("/latest")
    assert request.query.get("apikey") == ([key] if key else None)


def test_the_issues_example_a_host_with_https(monkeypatch: pytest.MonkeyPatch) -> None:
    # the hand parser this replaced took `http://https://api.example.com` for host "https"
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", "http://https://api.example.com/v7")
    assert runtime._http_conn(runtime.PRICES_CONN_ID) == ("https://api.example.com/v7", None)


def test_a_value_airflow_cannot_read_names_the_variable_and_hides_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s{uuid.uuid4().hex}"
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", f"postgresql://app:{secret}@db:notaport/x")
    with pytest.raises(connections.ConnectionNotConfigured) as caught:
        connections.get_connection(connections.POSTGRES_CONN_ID)
    message = str(caught.value)
    assert message.startswith("AIRFLOW_CONN_OVERNIGHT_POSTGRES: Airflow cannot read this URI (value hidden)")
    assert secret not in message and caught.value.__cause__ is None and caught.value.__suppress_context__
