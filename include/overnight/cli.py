"""`make run` and `make demo`: run market DAGs in-process (dag.test) and print what they did."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from overnight import db, sessions
from overnight.markets import UnknownMarketError, get_market, load_markets

ROOT = Path(__file__).resolve().parents[2]


def _load_dag(dag_id: str) -> Any:
    """Returns a freshly built market DAG (a DAG object that ran once keeps that run's conf in its params)."""
    if str(ROOT / "dags") not in sys.path:
        sys.path.insert(0, str(ROOT / "dags"))
    import importlib

    import overnight_scoring

    dag = getattr(importlib.reload(overnight_scoring), dag_id)
    # In-process runs have no scheduler to watch a deadline, and Airflow 3.3.2's dag.test() fails after a
    # successful run of a DAG with a DeadlineAlert (it looks the alert up by the object, not its id).
    dag.deadline = None
    return dag


def run_market(code: str, session: date | None, *, force: bool = False, batch_size: int | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Runs one market's DAG in-process for a session; returns its job-run row as a dict."""
    market = get_market(code)
    if session is None:
        session = sessions.next_run(market.code, market.lead, datetime.now(UTC), inclusive=False)[0]
    conf: dict[str, Any] = {"session_date": session.isoformat(), "force": force}
    if batch_size:
        conf["batch_size"] = batch_size
    dag = _load_dag(market.dag_id)
    if quiet:
        logging.getLogger("airflow").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    dag_run = dag.test(run_conf=conf)
    wall = time.perf_counter() - t0
    with db.connect() as conn:
        row = conn.execute(
            "SELECT status, users_processed, users_failed, correlation_id, metrics, error_details FROM"
            " overnight_job_runs WHERE market = %s AND session_date = %s ORDER BY started_at DESC LIMIT 1",
            (market.code, session),
        ).fetchone()
    result = {"market": market.code, "session": session.isoformat(), "wall_s": round(wall, 1),
              "dag_run_state": str(getattr(dag_run, "state", "")), "status": None, "processed": 0, "failed": 0}
    if row:
        result.update(status=row[0], processed=row[1], failed=row[2], correlation_id=str(row[3]),
                      metrics=row[4], errors=row[5])
    return result


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'market':<7} {'session':<11} {'processed':>9} {'failed':>7} {'status':<10} {'wall s':>7} {'users/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = r["processed"] / r["wall_s"] if r["wall_s"] else 0
        lines.append(f"{r['market']:<7} {r['session']:<11} {r['processed']:>9,} {r['failed']:>7,} "
                     f"{str(r['status']):<10} {r['wall_s']:>7.1f} {rate:>8.0f}")
    return "\n".join(lines)


def _where_next() -> str:
    return (
        "\nWhere to look next:\n"
        "  - job runs:        SELECT * FROM overnight_job_runs ORDER BY started_at DESC;  (overnight_postgres)\n"
        "  - audit trail:     SELECT event_type, count(*) FROM calculation_events GROUP BY 1;\n"
        "  - cache:           redis-cli --scan --pattern 'recs:*' | head  (overnight_redis)\n"
        "  - the Airflow UI:  make airflow, then http://127.0.0.1:8080 (passwords: .local/airflow/passwords.json),\n"
        "                     DAGs overnight_scoring_*, and the Overnight page\n"
        "  - one market:      make run MARKET=XNYS [DATE=YYYY-MM-DD]\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: run MARKET [--date D] | demo."""
    parser = argparse.ArgumentParser(prog="python -m overnight.cli")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one market's DAG once, in-process")
    run.add_argument("--market", required=True, help="exchange-calendars code, e.g. XNYS")
    run.add_argument("--date", default="", help="session date YYYY-MM-DD (default: the next session)")
    run.add_argument("--force", action="store_true", help="start a new calculation for that session")
    run.add_argument("--batch-size", type=int, default=None)
    sub.add_parser("demo", help="run every market's DAG once for its next session and print a table")
    args = parser.parse_args(argv)
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if args.cmd == "run":
        try:
            market = get_market(args.market.upper())
            session = sessions.validate_session_date(market.code, args.date) if args.date else None
        except (UnknownMarketError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        result = run_market(market.code, session, force=args.force, batch_size=args.batch_size)
        print("\n" + _table([result]))
        if result.get("errors"):
            print(f"errors: {str(result['errors'])[:2000]}")
        print(_where_next())
        return 0 if result["status"] in ("completed", "partial") else 1
    loaded = load_markets()
    for err in loaded.errors:
        print(f"warning: {err}", file=sys.stderr)
    rows = [run_market(m.code, None, quiet=True) for m in loaded.markets]
    print("\n" + _table(rows))
    print(_where_next())
    return 0 if all(r["status"] in ("completed", "partial") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
