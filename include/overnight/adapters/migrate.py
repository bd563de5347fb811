"""Ordered, versioned SQL migrations (`migrations/NNNN_name.sql`), applied once each, idempotently."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import psycopg

from overnight.adapters import db

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_ID = 0x0F0E11  # pg_advisory_lock key: one migrator at a time


def migration_files() -> list[Path]:
    """Returns the migration files in the order they apply."""
    return sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def migrate(dsn: str | None = None) -> list[str]:
    """Applies every migration not yet applied; returns the names applied now."""
    applied_now: list[str] = []
    with db.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                v: (n, c) for v, n, c in conn.execute("SELECT version, name, checksum FROM schema_migrations")
            }
            for path in migration_files():
                version = int(path.name[:4])
                body = path.read_text()
                checksum = hashlib.sha256(body.encode()).hexdigest()
                if version in done:
                    if done[version][1] != checksum:
                        raise RuntimeError(
                            f"migration {path.name} changed after it was applied (checksum differs); "
                            "add a new migration file instead of editing an applied one"
                        )
                    continue
                with conn.transaction():
                    conn.execute(body)  # type: ignore[arg-type]
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (version, path.name, checksum),
                    )
                log.debug("applied migration %s", path.name)  # the command prints them all in one line
                applied_now.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied_now


def main(argv: list[str] | None = None) -> int:
    """Command line: apply pending migrations to the `overnight_postgres` database."""
    argparse.ArgumentParser(prog="python -m overnight.adapters.migrate", description=__doc__).parse_args(argv)
    try:
        names = migrate()
    except psycopg.OperationalError as exc:
        print(f"error: connection 'overnight_postgres': {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"migrations: {len(names)} applied" + (f" ({', '.join(names)})" if names else ", schema up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
