"""A default contribution below zero (issue 22: it broke "amounts + unallocated = contribution"): the schema
refuses it (migration 0009), and a row written before the check fails only its user, at stage load, naming it."""

from __future__ import annotations

from datetime import date

import psycopg
import pytest

from tests.support import reliability as R
from tests.support.pipeline_run import run_pipeline


def test_the_schema_refuses_it_and_an_older_row_fails_only_its_user() -> None:
    with R.scratch_database("negcontrib", users=60) as dsn, psycopg.connect(dsn) as conn:
        victim = sorted(R.served(conn, "XNYS", date(2027, 2, 3)))[0]
        with pytest.raises(psycopg.errors.CheckViolation, match="users_default_contribution_not_negative"):
            conn.execute("UPDATE users SET default_contribution = -5 WHERE id = %s", (victim,))
        conn.rollback()
        # a row from before the check (it is NOT VALID: existing rows are not refused by the migration)
        conn.execute("ALTER TABLE users DROP CONSTRAINT users_default_contribution_not_negative")
        conn.execute("UPDATE users SET default_contribution = -5 WHERE id = %s", (victim,))
        conn.execute("ALTER TABLE users ADD CONSTRAINT users_default_contribution_not_negative"
                     " CHECK (default_contribution >= 0) NOT VALID")
        conn.commit()
        run = run_pipeline(conn, "XNYS", date(2027, 2, 3), "test-negative-contribution", force=True)
        failed = conn.execute("SELECT user_id::text, stage, error FROM overnight_job_users WHERE job_run_id = %s"
                              " AND status = 'failed'", (run.job.id,)).fetchall()
    assert failed == [(victim, "load", "default_contribution is -5.0000, below zero; set it to 0 or more")]
    assert run.summary["status"] == "partial" and run.summary["users_failed"] == 1
