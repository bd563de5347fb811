"""A market run under a live scheduler, api-server and dag-processor, configured as production is (issue 23):
the scoring tasks run in the pool `overnight_scoring` (made by `airflow pools import include/pools.json`, as
docs/deploy.md says), and with Airflow's traces on the night's spans are children of the spans Airflow's task
runner opens around each task, with the correlation id as an attribute.

The oracle for the spans is Airflow itself: its console exporter (`OTEL_TRACES_EXPORTER=console`) prints every
span of the task process, Airflow's `worker.score_batch[i]` and the package's `overnight-scoring-batch`, to
the task's output, which Airflow keeps in the task log.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime

import psycopg
import pytest

from tests.support import reliability as R
from tests.support.live_airflow import live_airflow, quiet_market

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SESSION = date(2026, 11, 17)


def _spans(log: str) -> list[dict]:
    """The JSON spans the console exporter wrote to the task's stdout, which Airflow's task log keeps one
    line per entry (`"logger": "task.stdout"`); each span is one JSON object over several lines."""
    stdout = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("logger") == "task.stdout":
            stdout.append(str(entry.get("event", "")))
    text = "\n".join(stdout)
    found = []
    for match in re.finditer(r'^\{\n\s*"name": "[^"]+",.*?^\}$', text, re.DOTALL | re.MULTILINE):
        try:
            found.append(json.loads(match.group(0)))
        except ValueError:
            continue
    return found


def test_scoring_runs_in_its_pool_and_its_spans_join_airflows(airflow_db, tmp_path):
    market = quiet_market()
    run_id = "production_path"
    with R.scratch_database("prodpath", users=400) as dsn, \
            live_airflow(tmp_path, dsn, tag="prodpath", AIRFLOW__TRACES__OTEL_ON="True",
                         OTEL_TRACES_EXPORTER="console") as af:
        R.wait_until(lambda: af.dag_parsed(market.dag_id), 180, 1, "the dag-processor to parse the DAG")
        af.trigger(market.dag_id, run_id, {"session_date": SESSION.isoformat(), "batch_size": 20, "force": True},
                   logical_date=datetime.now(UTC).isoformat())
        assert af.wait_finished(market.dag_id, run_id) == "success", af.log_tail("scheduler")
        with psycopg.connect(af.af_dsn) as c:
            pools = c.execute("SELECT task_id, pool, count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s"
                              " GROUP BY task_id, pool ORDER BY task_id", (market.dag_id, run_id)).fetchall()
            mapped = c.execute("SELECT count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s"
                               " AND task_id = 'score_batch'", (market.dag_id, run_id)).fetchone()[0]
        with psycopg.connect(dsn) as c:
            served = len(R.served(c, market.code, SESSION))
            correlation = str(c.execute("SELECT correlation_id FROM overnight_job_runs WHERE market = %s AND"
                                        " session_date = %s", (market.code, SESSION)).fetchone()[0])
        assert mapped == -(-served // 20) > 1
        assert pools == [("fetch_rates", "default_pool", 1), ("finalize", "default_pool", 1),
                         ("plan_batches", "default_pool", 1), ("score_batch", "overnight_scoring", mapped),
                         ("start", "default_pool", 1)]

        logs = sorted((tmp_path / "airflow-home" / "logs").rglob("*.log"))
        batch_logs = [p.read_text(errors="replace") for p in logs if "task_id=score_batch" in str(p)]
        assert len(batch_logs) == mapped, [str(p) for p in logs]
        for log in batch_logs:
            spans = {s["name"]: s for s in _spans(log)}
            worker = next(s for name, s in spans.items() if name.startswith("worker.score_batch"))
            batch = spans["overnight-scoring-batch"]
            assert batch["parent_id"] == worker["context"]["span_id"], (batch, worker)
            assert batch["context"]["trace_id"] == worker["context"]["trace_id"]
            assert batch["attributes"]["overnight.correlation_id"] == correlation
