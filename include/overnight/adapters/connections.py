"""The two Airflow connections this package reaches its stores through, resolved by Airflow itself.

`overnight_postgres` (type postgres, `PostgresHook`) and `overnight_redis` (type redis). Airflow finds them
in its own order (a secrets backend, then `AIRFLOW_CONN_<ID>`, then the metadata database where the process
may read it) and registers their passwords with its secret masker. Airflow parses every standard form
(URI, JSON, `?__extra__=`, a host with a protocol); this module only turns its `Connection` into what psycopg
and redis-py take, and makes a value Airflow cannot read a clear error that never quotes the value.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from overnight.adapters.redaction import REDACTED, redact

if TYPE_CHECKING:
    from airflow.sdk import Connection

POSTGRES_CONN_ID = "overnight_postgres"
REDIS_CONN_ID = "overnight_redis"
PG_DEFAULTS = {"connect_timeout": 10, "application_name": "overnight"}  # unless the connection's extras say


class ConnectionNotConfigured(RuntimeError):
    """A connection is missing or unusable; the message names it and says how to set it."""


def env_name(conn_id: str) -> str:
    """Returns the environment variable Airflow reads a connection from."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def from_value(conn_id: str, value: str) -> Connection:
    """Returns the Connection Airflow makes of an `AIRFLOW_CONN_*` value (URI or JSON), or a clear error.

    Airflow's own parser (`Connection.from_json` / `from_uri`); its errors quote the value, so they are
    replaced by one that names the variable and the problem's kind and hides the value."""
    from airflow.sdk import Connection

    value = value.strip()
    where = env_name(conn_id)
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConnectionNotConfigured(
                f"{where}: not valid JSON ({exc.msg} at char {exc.pos}; value hidden); give a URI such as "
                "postgresql://user:pass@host:5432/db or Airflow's JSON form {\"conn_type\": ..., \"host\": ...}"
            ) from None
        if not isinstance(data, dict):
            raise ConnectionNotConfigured(f"{where}: JSON {type(data).__name__}, not an object; give Airflow's "
                                          "JSON form {\"conn_type\": ..., \"host\": ..., ...}")
        extra = data.get("extra")
        if isinstance(extra, str) and extra:
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError as exc:
                raise ConnectionNotConfigured(
                    f"{where}: 'extra' is not valid JSON ({exc.msg} at char {exc.pos}; value hidden)") from None
        if extra is not None and not isinstance(extra, dict):
            raise ConnectionNotConfigured(f"{where}: 'extra' must be a JSON object (value hidden)")
        try:
            return _masked(Connection.from_json(value, conn_id=conn_id))
        except (TypeError, ValueError):
            raise ConnectionNotConfigured(
                f"{where}: Airflow's JSON form has a bad field (a 'port' that is not a whole number, or a key "
                "Airflow does not know; value hidden): give conn_type, host, port, login, password, schema, extra"
            ) from None
    if "://" not in value:
        # the value itself is never echoed: it may be all password (`//app:secret@db/x`)
        raise ConnectionNotConfigured(
            f"{where}: the value ({len(value)} characters, hidden) is not a URI: it has no scheme; give one such "
            "as postgresql://user:pass@host:5432/db or redis://host:6379/0 (percent-encode / ? # @ : in the password)"
        )
    try:
        conn = _masked(Connection.from_uri(value, conn_id=conn_id))
    except Exception:  # noqa: BLE001 - Airflow raises AirflowException or ValueError, both quoting the value
        raise ConnectionNotConfigured(
            f"{where}: Airflow cannot read this URI (value hidden): a port that is not a number from 0 to 65535, "
            "or an unencoded / ? # @ : in the password (percent-encode them: %2F %3F %23 %40 %3A)"
        ) from None
    return conn


def _masked(conn: Connection) -> Connection:
    """Registers the connection's password and extras with Airflow's secret masker (as `Connection.get` does)."""
    from airflow.sdk.log import mask_secret

    if conn.password:
        mask_secret(conn.password)
    if conn.extra:
        mask_secret(conn.extra)
    return conn


def get_connection(conn_id: str, *, server: bool = False) -> Connection:
    """Returns the connection as Airflow resolves it (secrets backends, environment, metadata database).

    Through the Task SDK (`airflow.sdk.Connection.get`), in a task and in a tool; `server=True` (the api-server,
    which may read the metadata database) also asks `airflow.models.Connection`, so connections added in the UI
    are found there too."""
    value = os.environ.get(env_name(conn_id))
    if value:
        from_value(conn_id, value)  # a value Airflow cannot parse: the clear error, not "not defined"
    from airflow.sdk import Connection

    try:
        return Connection.get(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException, or a backend's own error
        found = _from_metadata_database(conn_id) if server else None
        if found is not None:
            return found
        raise ConnectionNotConfigured(
            f"connection '{conn_id}' is not defined: set {env_name(conn_id)}, add it with `airflow connections "
            f"add {conn_id}` or a secrets backend, or in dev to airflow_settings.yaml ({type(exc).__name__})"
        ) from None  # the cause's text may quote a stored value; its type is named above


def _from_metadata_database(conn_id: str) -> Connection | None:
    """The connection from the metadata database, in a process that may read it (the api-server: the Task
    SDK's chain there holds only the environment and secrets backends)."""
    try:
        from airflow.models.connection import Connection as StoredConnection

        stored = StoredConnection.get_connection_from_secrets(conn_id)
    except Exception:  # noqa: BLE001 - not there either
        return None
    from airflow.sdk import Connection

    return Connection(conn_id=conn_id, conn_type=stored.conn_type, host=stored.host, schema=stored.schema,
                      login=stored.login, password=stored.password, port=stored.port, extra=stored.extra)


def redacted(conn: Connection) -> str:
    """Returns a URI for messages and logs: the password masked, no extras (they may hold secrets too)."""
    auth = ""
    if conn.login or conn.password:
        auth = f"{conn.login or ''}{':' + REDACTED if conn.password else ''}@"
    port = f":{conn.port}" if conn.port else ""
    return f"{conn.conn_type}://{auth}{conn.host or ''}{port}/{conn.schema or ''}"


def postgres_kwargs(conn: Connection | None = None, *, dbname: str | None = None,
                    defaults: bool = True) -> dict[str, Any]:
    """Returns psycopg's connect arguments as `PostgresHook.get_conn` makes them (its ignored extras dropped),
    with this package's defaults (connect_timeout 10 s, application_name) where the extras say nothing."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = conn or get_connection(POSTGRES_CONN_ID)
    kwargs: dict[str, Any] = {**(PG_DEFAULTS if defaults else {}), "host": conn.host or "localhost", "port": conn.port,
                              "user": conn.login, "password": conn.password,
                              "dbname": dbname or conn.schema or "postgres"}
    for key, value in (conn.extra_dejson or {}).items():
        if key not in PostgresHook.ignored_extra_options:
            kwargs[key] = value
    return {k: v for k, v in kwargs.items() if v is not None and v != ""}


def postgres_dsn(conn: Connection | None = None, *, dbname: str | None = None) -> str:
    """Returns a libpq URI for psycopg (and, with a driver added, SQLAlchemy) from the `overnight_postgres`
    connection: the arguments of `postgres_kwargs`, `dbname` replacing the connection's database when given."""
    # a DSN is handed to other tools (SQLAlchemy, Airflow, a test's pool): only what the connection says
    kwargs = postgres_kwargs(conn, dbname=dbname, defaults=False)
    auth = ""
    if kwargs.get("user"):
        auth = quote(str(kwargs.pop("user")), safe="")
        if kwargs.get("password"):
            auth += ":" + quote(str(kwargs.pop("password")), safe="")
        auth += "@"
    kwargs.pop("password", None)
    host = quote(str(kwargs.pop("host")), safe="")
    port = f":{kwargs.pop('port')}" if kwargs.get("port") else ""
    kwargs.pop("port", None)
    db = quote(str(kwargs.pop("dbname")), safe="")
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in sorted(kwargs.items()))
    return f"postgresql://{auth}{host}{port}/{db}" + (f"?{query}" if query else "")


def postgres_hook(conn: Connection | None = None) -> Any:
    """Returns the provider's PostgresHook (psycopg 3) over the connection, this package's defaults merged in."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook
    from airflow.sdk import Connection

    conn = conn or get_connection(POSTGRES_CONN_ID)
    extra = {**PG_DEFAULTS, **(conn.extra_dejson or {})}
    merged = Connection(conn_id=conn.conn_id, conn_type=conn.conn_type, host=conn.host, schema=conn.schema,
                        login=conn.login, password=conn.password, port=conn.port, extra=json.dumps(extra))
    return PostgresHook(postgres_conn_id=conn.conn_id, connection=merged)


def redis_db(conn: Connection) -> int:
    """The Redis database: the redis provider's `db` extra, else the URI's path, else 0."""
    raw = (conn.extra_dejson or {}).get("db") or conn.schema or 0
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConnectionNotConfigured(f"{conn.conn_id}: the Redis database (extra 'db' or the URI's path) must be "
                                      "a whole number from 0 to 15 (value hidden)") from None


def redis_uses_tls(conn: Connection) -> bool:
    """True for a `rediss` connection or the redis provider's `ssl` extra."""
    return str((conn.extra_dejson or {}).get("ssl", "")).lower() == "true" or conn.conn_type == "rediss"


def redis_url(conn: Connection | None = None) -> str:
    """Returns a redis-py URL from the `overnight_redis` connection (for `from_url` and the dashboard's client)."""
    conn = conn or get_connection(REDIS_CONN_ID)
    auth = ""
    if conn.password:
        auth = f"{quote(conn.login or '', safe='')}:{quote(conn.password, safe='')}@"
    scheme = "rediss" if redis_uses_tls(conn) else "redis"
    return f"{scheme}://{auth}{conn.host or 'localhost'}:{conn.port or 6379}/{redis_db(conn)}"


def redis_client(conn: Connection | None = None, *, timeout_s: float = 2.0) -> Any:
    """Returns a redis-py client built from the Airflow connection, with short socket timeouts (the cache is
    optional: a slow Redis must not hold a night up)."""
    import redis

    conn = conn or get_connection(REDIS_CONN_ID)
    extra = conn.extra_dejson or {}
    tls: dict[str, Any] = {}
    if redis_uses_tls(conn):
        tls = {"ssl": True, **{k: extra[k] for k in ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
                               if k in extra}}
    return redis.Redis(host=conn.host or "localhost", port=conn.port or 6379, db=redis_db(conn),
                       username=conn.login or None, password=conn.password or None,
                       socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=30, **tls)


# --------------------------------------------------------------------------- reachability


def failure_line(exc: BaseException, conn: Connection | None = None) -> str:
    """An exception as one line ("Type: first line"), the connection's password masked."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return redact(line, [conn.password] if conn is not None else [])


def reach_postgres(conn: Connection, timeout_s: float, application_name: str = "overnight-check") -> None:
    """Connects to the connection's database and runs SELECT 1; raises the driver's error if it cannot."""
    import psycopg

    kwargs = {**postgres_kwargs(conn), "connect_timeout": max(1, round(timeout_s)),
              "application_name": application_name}
    with psycopg.connect(**kwargs) as pg:
        pg.execute("SELECT 1").fetchone()


def reach_redis(conn: Connection, timeout_s: float) -> None:
    """PINGs the connection's Redis; raises the client's error (or ConnectionError without PONG)."""
    client = redis_client(conn, timeout_s=timeout_s)
    try:
        if not client.ping():
            raise ConnectionError("PING did not answer PONG")
    finally:
        client.close()
