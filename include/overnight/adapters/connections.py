"""The two Airflow connections this package reaches its stores through, resolved without a scheduler.

`overnight_postgres` (type postgres) and `overnight_redis` (type redis). An `AIRFLOW_CONN_<ID>`
environment variable (URI or JSON, as Airflow accepts) wins; otherwise, inside Airflow, the
connection is looked up through the Task SDK (secrets backends, `airflow_settings.yaml`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from overnight.adapters.redaction import REDACTED, redact

POSTGRES_CONN_ID = "overnight_postgres"
REDIS_CONN_ID = "overnight_redis"


class ConnectionNotConfigured(RuntimeError):
    """A connection is missing or unusable; the message names it and says how to set it."""


@dataclass(frozen=True)
class ConnInfo:
    """The parts of an Airflow connection this package uses."""

    conn_id: str
    conn_type: str
    host: str | None
    port: int | None
    login: str | None
    password: str | None = field(repr=False)  # never in a repr, log line or error: see `redacted`
    schema: str | None
    extra: dict[str, str] = field(default_factory=dict, repr=False)  # may hold secrets too (sslpassword, api_key)

    def redacted(self) -> str:
        """Returns a URI for messages and logs, password masked."""
        auth = ""
        if self.login or self.password:
            auth = f"{self.login or ''}{':' + REDACTED if self.password else ''}@"
        port = f":{self.port}" if self.port else ""
        return f"{self.conn_type}://{auth}{self.host or ''}{port}/{self.schema or ''}"


def _env_name(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def parse_connection(conn_id: str, value: str) -> ConnInfo:
    """Parses an `AIRFLOW_CONN_*` value (URI or JSON) into a ConnInfo."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConnectionNotConfigured(
                f"{_env_name(conn_id)}: not valid JSON ({exc.msg} at char {exc.pos}); "
                "give a URI such as postgresql://user:pass@host:5432/db or Airflow's JSON form"
            ) from None
        if not isinstance(data, dict):
            raise ConnectionNotConfigured(f"{_env_name(conn_id)}: JSON {type(data).__name__}, not an object; "
                                          "give Airflow's JSON form {\"conn_type\": ..., \"host\": ..., ...}")
        extra = data.get("extra") or {}
        if isinstance(extra, str):
            try:
                extra = json.loads(extra) if extra else {}
            except json.JSONDecodeError as exc:
                raise ConnectionNotConfigured(
                    f"{_env_name(conn_id)}: 'extra' is not valid JSON ({exc.msg} at char {exc.pos}; value hidden)"
                ) from None
        if not isinstance(extra, dict):
            raise ConnectionNotConfigured(f"{_env_name(conn_id)}: 'extra' must be a JSON object (value hidden)")
        try:
            port = int(data["port"]) if data.get("port") else None
        except (TypeError, ValueError):
            raise ConnectionNotConfigured(
                f"{_env_name(conn_id)}: 'port' must be a whole number (value hidden)") from None
        return ConnInfo(
            conn_id=conn_id,
            conn_type=str(data.get("conn_type", "")),
            host=data.get("host"),
            port=port,
            login=data.get("login"),
            password=data.get("password"),
            schema=data.get("schema"),
            extra={str(k): str(v) for k, v in extra.items()},
        )
    parts = urlsplit(value)
    if not parts.scheme:
        # the value itself is never echoed: it may be all password (`//app:secret@db/x`)
        raise ConnectionNotConfigured(
            f"{_env_name(conn_id)}: the value ({len(value)} characters, hidden) is not a URI: it has no scheme; "
            "give one such as postgresql://user:pass@host:5432/db or redis://host:6379/0 (percent-encode "
            "/ ? # @ : in the password)"
        )
    try:
        port = parts.port
    except ValueError:
        # urlsplit's message quotes what it took for the port: with an unencoded / ? # in the password, that is
        # part of the password
        raise ConnectionNotConfigured(
            f"{_env_name(conn_id)}: the port is not a number from 0 to 65535 (value hidden); if the password "
            "holds / ? # @ or :, percent-encode them (%2F %3F %23 %40 %3A)"
        ) from None
    return ConnInfo(
        conn_id=conn_id,
        conn_type=parts.scheme.replace("-", "_"),
        host=unquote(parts.hostname) if parts.hostname else None,
        port=port,
        login=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        schema=unquote(parts.path.lstrip("/")) or None,
        extra=dict(parse_qsl(parts.query)),
    )


def get_connection(conn_id: str) -> ConnInfo:
    """Returns the connection from its environment variable, else from Airflow."""
    value = os.environ.get(_env_name(conn_id))
    if value:
        return parse_connection(conn_id, value)
    try:
        from airflow.sdk import BaseHook
    except ImportError as exc:  # pragma: no cover - Airflow is a requirement
        raise ConnectionNotConfigured(f"{conn_id}: set {_env_name(conn_id)}") from exc
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - Airflow raises several kinds for "not found"
        raise ConnectionNotConfigured(
            f"connection '{conn_id}' is not defined: set {_env_name(conn_id)} "
            f"or add it to airflow_settings.yaml ({type(exc).__name__})"
        ) from None  # the cause's text may quote a stored value; its type is named above
    return ConnInfo(
        conn_id=conn_id,
        conn_type=conn.conn_type or "",
        host=conn.host,
        port=conn.port,
        login=conn.login,
        password=conn.password,
        schema=conn.schema,
        extra={str(k): str(v) for k, v in (conn.extra_dejson or {}).items()},
    )


def postgres_dsn(info: ConnInfo | None = None) -> str:
    """Returns a libpq URI for psycopg from the `overnight_postgres` connection."""
    info = info or get_connection(POSTGRES_CONN_ID)
    auth = ""
    if info.login:
        auth = quote(info.login, safe="")
        if info.password:
            auth += ":" + quote(info.password, safe="")
        auth += "@"
    host = info.host or "localhost"
    port = f":{info.port}" if info.port else ""
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in sorted(info.extra.items()))
    return f"postgresql://{auth}{host}{port}/{quote(info.schema or 'postgres', safe='')}" + (
        f"?{query}" if query else ""
    )


def redis_url(info: ConnInfo | None = None) -> str:
    """Returns a redis-py URL from the `overnight_redis` connection (db from path or extra)."""
    info = info or get_connection(REDIS_CONN_ID)
    db = info.extra.get("db") or info.schema or "0"
    auth = ""
    if info.password:
        auth = f"{quote(info.login or '', safe='')}:{quote(info.password, safe='')}@"
    scheme = "rediss" if info.extra.get("ssl", "").lower() == "true" or info.conn_type == "rediss" else "redis"
    return f"{scheme}://{auth}{info.host or 'localhost'}:{info.port or 6379}/{db}"


# --------------------------------------------------------------------------- reachability


def failure_line(exc: BaseException, info: ConnInfo | None = None) -> str:
    """An exception as one line ("Type: first line"), the connection's password masked."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return redact(line, [info.password] if info else [])


def reach_postgres(info: ConnInfo, timeout_s: float, application_name: str = "overnight-check") -> None:
    """Connects to the connection's database and runs SELECT 1; raises the driver's error if it cannot."""
    import psycopg

    with psycopg.connect(postgres_dsn(info), connect_timeout=max(1, round(timeout_s)),
                         application_name=application_name) as conn:
        conn.execute("SELECT 1").fetchone()


def reach_redis(info: ConnInfo, timeout_s: float) -> None:
    """PINGs the connection's Redis; raises the client's error (or ConnectionError without PONG)."""
    import redis

    client = redis.Redis.from_url(redis_url(info), socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        if not client.ping():
            raise ConnectionError("PING did not answer PONG")
    finally:
        client.close()
