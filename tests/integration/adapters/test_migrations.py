"""Migrations apply on an empty database, again with no change, and refuse edited history."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from overnight.adapters import migrate
from overnight.adapters.connections import POSTGRES_CONN_ID, from_value, postgres_dsn
from overnight.dev import devenv

TABLES = {"users", "holdings", "watchlist", "assets", "asset_classes", "allocation_targets", "criteria_sets",
          "prices", "exchange_rates", "calculation_chunks", "overnight_job_runs", "overnight_job_users",
          "recommendations", "schema_migrations", "calculation_events_rows", "recommendation_history_rows",
          "overnight_job_criteria", "overnight_job_rates", "overnight_job_scores"}


@pytest.fixture
def empty_db(pg_dsn):
    base = from_value(POSTGRES_CONN_ID, pg_dsn)
    name = f"{base.schema}_m{uuid.uuid4().hex[:6]}"
    devenv.create_database(base, name)
    yield postgres_dsn(base, dbname=name)
    with psycopg.connect(postgres_dsn(base, dbname="postgres"), autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_apply_on_empty_then_again_changes_nothing(empty_db):
    first = migrate.migrate(empty_db)
    assert first == [p.name for p in migrate.migration_files()]
    with psycopg.connect(empty_db) as c:
        tables = {r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        before = c.execute("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY 1").fetchall()
    assert TABLES <= tables
    assert migrate.migrate(empty_db) == []
    with psycopg.connect(empty_db) as c:
        assert c.execute("SELECT version, checksum, applied_at FROM schema_migrations ORDER BY 1").fetchall() == before


def test_events_are_partitioned_monthly(empty_db):
    migrate.migrate(empty_db)
    with psycopg.connect(empty_db) as c:
        parts = [r[0] for r in c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'calculation_chunks'::regclass")]
        created = c.execute("SELECT ensure_event_partitions('2030-01-15', 2)").fetchone()[0]
        again = c.execute("SELECT ensure_event_partitions('2030-01-01', 2)").fetchone()[0]
        made = {r[0] for r in c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'calculation_chunks'::regclass")}
        views = {r[0] for r in c.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    assert "calculation_chunks_default" in parts
    assert len([p for p in parts if p != "calculation_chunks_default"]) >= 3
    assert (created, again) == (2, 0)  # two months of the chunks (the tables before migration 0011 take no rows)
    assert {"calculation_chunks_2030_01", "calculation_chunks_2030_02"} <= made
    assert {"calculation_events", "recommendation_history"} <= views  # what an auditor queries


def test_edited_migration_is_refused(empty_db, monkeypatch, tmp_path):
    migrate.migrate(empty_db)
    for p in migrate.migration_files():
        (tmp_path / p.name).write_text(p.read_text())
    first = sorted(tmp_path.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        migrate.migrate(empty_db)
