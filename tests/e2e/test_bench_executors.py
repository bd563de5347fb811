"""`make bench` end to end on a small N, under the real scheduler: LocalExecutor and CeleryExecutor.

The same DAGs, unchanged, give the same results on both executors: every user processed once, four
events each, one document each, two cache keys each, every DAG run successful.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USERS = 400

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _bench(executor: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include")}
    proc = subprocess.run(
        [sys.executable, "-m", "overnight.dev.bench", "--users", str(USERS), "--executor", executor,
         "--batch-size", "60", "--api-seconds", "2", "--quiet-wait", "10"],  # other tests run beside it
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("executor", ["local", "celery"])
def test_bench_runs_every_user_once(executor):
    f = _bench(executor)
    assert f["executor"] == executor
    assert set(f["dag_run_states"].values()) == {"success"}
    assert (f["users_processed"], f["users_failed"]) == (USERS, 0)
    assert f["events_written"] == 4 * USERS
    assert f["documents_written"] == USERS
    # one recs: and one portfolio: key per user, each kind counted
    assert (f["redis_recs_keys"], f["redis_portfolio_keys"], f["redis_keys"]) == (USERS, USERS, 2 * USERS)
    assert f["batches"] >= 4  # mapped over several batches per market
    for key in ("wall_s", "floor_io_s", "floor_orch_s", "users_per_s", "api_hit_p99_ms", "api_miss_p99_ms",
                "api_noop_p99_ms", "calibration_s", "bench_self_peak_rss_mb", "bench_children_peak_rss_mb"):
        assert f[key] > 0, key
    slices = f["api_rps_by_slice"]  # one rate per round and case; together they make the case's rate
    assert set(slices) == {"hit", "miss", "noop"} and all(len(v) == f["api_rounds"] for v in slices.values())
    assert all(rate > 0 for v in slices.values() for rate in v)
    assert min(slices["hit"]) <= f["api_hit_rps"] <= max(slices["hit"])
    during_night = f["cpu_s_by_process"]  # where the CPU went during the market runs: the sampler saw each kind
    assert all(during_night.get(kind, 0) > 0 for kind in ("tasks", "postgres", "scheduler", "bench")), during_night
    assert f["floor_orch_cpu_s_by_process"]["tasks"] > 0  # the no-op tasks' own cost, sampled the same way
    if executor == "local":  # a task runner titles itself "airflow worker -- <ti id>": its peak RSS is the figure
        assert 50 < f["peak_rss_mb"] < 2000
    during_api = f["api_cpu_s_by_process"]  # where the CPU went while the dashboard was measured
    assert during_api["api-server"] > 0 and during_api["loadgen"] > 0
    if executor == "local":  # no task runs then (Celery's idle workers count as "tasks")
        assert during_api.get("tasks", 0) == 0
    # Redis answers throughout: the dashboard never falls back to Postgres for it.
    assert f["api_redis_fallbacks"] == 0
    # A count of replies over 1 s (machine load decides it), and a measured VACUUM ANALYZE of 400 users' tables.
    assert type(f["api_redis_late"]) is int
    assert type(f["api_vacuum_s"]) is float and f["api_vacuum_s"] < 60
