"""`make invalidate` (`python -m overnight.night.invalidation`) on real Postgres and Redis: a user's two keys dropped
and the invalidation recorded by `make invalidate`; `--all` every cached key; clear errors, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import redis

from overnight.adapters import cache

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include")}
    return subprocess.run([sys.executable, "-m", "overnight.night.invalidation", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_invalidate_a_user_then_everyone(conn: psycopg.Connection, seeded: dict[str, int],
                                         redis_client: redis.Redis) -> None:
    user, other = [r[0] for r in conn.execute("SELECT id::text FROM users ORDER BY id LIMIT 2")]
    cache.warm(redis_client, [(user, "{}", "{}"), (other, "{}", "{}")])
    proc = _run("--user", user)
    assert (proc.returncode, proc.stdout) == (0, f"invalidated user {user}: 2 keys deleted\n"), proc.stderr
    assert redis_client.exists(cache.recs_key(user), cache.portfolio_key(user)) == 0
    row = conn.execute("SELECT invalidated_by, dag_run_id, invalidated_at <= clock_timestamp() FROM overnight_invalidations"
                       " WHERE user_id = %s", (user,)).fetchone()
    assert row == ("make invalidate", None, True)
    present = sum(1 for p in ("recs:*", "portfolio:*") for _ in redis_client.scan_iter(match=p))
    assert present >= 2
    everyone = _run("--all")
    assert (everyone.returncode, everyone.stdout) == (0, f"invalidated every user: {present} keys deleted\n")
    assert not any(redis_client.scan_iter(match="recs:*")) and not any(redis_client.scan_iter(match="portfolio:*"))
    conn.execute("DELETE FROM overnight_invalidations WHERE user_id = %s", (user,))
    conn.commit()


def test_errors_name_what_is_wrong() -> None:
    stranger = str(uuid.UUID(int=7))
    unknown = _run("--user", stranger)
    assert (unknown.returncode, unknown.stderr) == (2, f"error: user {stranger} is not in the users table\n")
    bad = _run("--user", "not-a-uuid")
    assert (bad.returncode, bad.stderr) == (2, "error: user id 'not-a-uuid' is not a UUID\n")
    alone = _run("--all", "--recalculate")
    assert alone.returncode == 2 and "--recalculate needs --user" in alone.stderr
