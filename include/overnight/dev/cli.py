"""`make run` and `make demo`: run market DAGs in-process (dag.test) and print what they did.

Airflow's task logs (hundreds of lines per run) go to a file under `.local/logs/`; the terminal shows one
progress line per market (users done / total, rate, ETA; a bar redrawn in place on a terminal), then the
table, then where the full log is. A market that fails prints its cause.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any

from overnight.adapters import db
from overnight.dev.devenv import private_umask
from overnight.domain import sessions
from overnight.domain.markets import UnknownMarketError, get_market, load_markets
from overnight.night import jobrun

ROOT = Path(__file__).resolve().parents[3]
LOG_DIR = ROOT / ".local" / "logs"
BAR_WIDTH = 24
POLL_SECONDS = 0.5
MAX_CAUSE_LINES = 8
KEEP_LOGS = 20  # per command (demo, run-XNYS, ...) in .local/logs/


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
            " overnight_job_runs WHERE market = %s AND session_date = %s AND job_type = 'scoring'"
            " ORDER BY started_at DESC LIMIT 1",
            (market.code, session),
        ).fetchone()
    result = {"market": market.code, "session": session.isoformat(), "wall_s": round(wall, 1),
              "dag_run_state": str(getattr(dag_run, "state", "")), "status": None, "processed": 0, "failed": 0}
    if row:
        result.update(status=row[0], processed=row[1], failed=row[2], correlation_id=str(row[3]),
                      metrics=row[4], errors=row[5])
    return result


def served_total(code: str, session: date) -> int:
    """How many users `code`'s run serves on `session` (active, none of their markets opening earlier)."""
    aud = jobrun.Audience(code, tuple(sessions.earlier_markets(code, session, load_markets().codes)))
    where, params = aud.where()
    with db.connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM users u WHERE {where}", params).fetchone()
    return int(row[0]) if row else 0


def _done(conn: Any, code: str, session: date) -> int:
    """Users the latest job run of (code, session) has finished, completed or failed."""
    row = conn.execute(
        "SELECT count(*) FROM overnight_job_users WHERE job_run_id = (SELECT id FROM overnight_job_runs"
        " WHERE market = %s AND session_date = %s ORDER BY started_at DESC LIMIT 1)", (code, session)).fetchone()
    return int(row[0]) if row else 0


def progress_line(code: str, session: date, done: int, total: int, elapsed: float, *, bar: bool,
                  finished: bool = False) -> str:
    """One market's progress: '[####----] 1,234/5,000 users  310 users/s  ETA 12 s' (bar only on a terminal)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    head = f"{code:<5} {session.isoformat()}"
    if bar:
        filled = BAR_WIDTH if total == 0 else min(BAR_WIDTH, BAR_WIDTH * done // total)
        head += f" [{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"
    tail = (f"done in {elapsed:.1f} s" if finished
            else f"ETA {(total - done) / rate:.0f} s" if rate > 0 and total >= done else "ETA -")
    return f"{head} {done:,}/{total:,} users  {rate:,.0f} users/s  {tail}"


class _Progress:
    """Polls the job run's finished users while a market runs; redraws one line on a terminal."""

    def __init__(self, out: IO[str], code: str, session: date, total: int) -> None:
        self.out, self.code, self.session, self.total = out, code, session, total
        self.tty = out.isatty()
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"progress-{code}", daemon=True)

    def __enter__(self) -> _Progress:
        if self.tty:
            self._draw(0)
            self._thread.start()
        return self

    def _draw(self, done: int, *, finished: bool = False) -> None:
        line = progress_line(self.code, self.session, done, self.total, time.perf_counter() - self.t0,
                             bar=self.tty, finished=finished)
        self.out.write(("\r\033[K" + line) if self.tty else line)
        if finished:
            self.out.write("\n")
        self.out.flush()

    def _poll(self) -> None:
        try:
            with db.connect() as conn:
                while not self._stop.wait(POLL_SECONDS):
                    self._draw(_done(conn, self.code, self.session))
                    conn.rollback()  # a fresh snapshot for the next poll
        except Exception:  # noqa: BLE001 - the progress line is cosmetic; the run itself reports errors
            return

    def finish(self, done: int) -> None:
        """Stops polling and prints the market's final line."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._draw(done, finished=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def prune_logs(folder: Path, name: str, keep: int = KEEP_LOGS) -> list[Path]:
    """Deletes all but the newest `keep - 1` logs of command `name` in `folder` (room for this run's); returns them."""
    logs = sorted(folder.glob(f"{name}-*.log"))  # the timestamp in the name sorts them by age
    old = logs[:max(0, len(logs) - (keep - 1))]
    for path in old:
        path.unlink(missing_ok=True)
    return old


@contextlib.contextmanager
def logs_to_file(name: str) -> Iterator[tuple[IO[str], Path | None]]:
    """Sends everything written to fds 1 and 2 (Airflow, tasks, warnings) to `.local/logs/<name>-<time>.log`.

    Yields a text stream on the original stdout for what the person should see, and the log's path.
    `OVERNIGHT_CLI_LOG=<path>` chooses the file; `OVERNIGHT_CLI_LOG=-` keeps every log on stdout (path None).
    """
    choice = os.environ.get("OVERNIGHT_CLI_LOG", "").strip()
    if choice == "-":
        yield sys.stdout, None
        return
    path = Path(choice) if choice else LOG_DIR / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not choice:
        prune_logs(LOG_DIR, name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    screen = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # Airflow's and the tasks' output: the owner's only, even in a file chosen or kept
    with open(fd, "ab", buffering=0) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield screen, path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            screen.close()


def _where_log(path: Path | None) -> str:
    """The last line: where the Airflow and task logs of this command are."""
    if path is None:
        return "Full log: above (OVERNIGHT_CLI_LOG=-)\n"
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"Full log (Airflow and task logs): {shown}\n"


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (Airflow's can go on with a JSON schema), at most 500 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:500]


def failure_cause(result: dict[str, Any], log_text: str) -> list[str]:
    """Why a market's run did not complete: the job run's recorded errors, else the error lines of its log."""
    errors = result.get("errors") or {}
    lines: list[str] = []
    if isinstance(errors, dict):
        if isinstance(errors.get("run"), dict):
            lines.append(f"{errors['run'].get('stage')}: {errors['run'].get('message')}")
        for user in (errors.get("users") or [])[:3]:
            lines.append(f"user {user.get('userId')} ({user.get('stage')}): {user.get('message')}")
        if errors.get("batches"):
            lines.append(f"batches not finished: {', '.join(errors['batches'][:5])}")
    if not lines:
        seen: list[str] = []
        for raw in log_text.splitlines():
            text = raw.strip()
            if ("[error" in text or "Exception:" in text or "Error:" in text) and text not in seen:
                seen.append(text)
        lines = [t[:300] for t in seen[-MAX_CAUSE_LINES:]]
    return lines or ["no error recorded; see the full log"]


def run_with_progress(screen: IO[str], log_path: Path | None, code: str, session: date | None,
                      **kwargs: Any) -> dict[str, Any]:
    """Runs one market with its progress line on `screen`; prints the cause under it when it fails."""
    market = get_market(code)
    if session is None:
        session = sessions.next_run(market.code, market.lead, datetime.now(UTC), inclusive=False)[0]
    start = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
    with _Progress(screen, market.code, session, served_total(market.code, session)) as bar:
        try:
            result = run_market(market.code, session, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported with its cause; the other markets still run
            logging.getLogger(__name__).exception("%s %s: the run raised", market.code, session)
            result = {"market": market.code, "session": session.isoformat(), "wall_s": 0.0, "status": None,
                      "processed": 0, "failed": 0, "dag_run_state": "", "errors": {"run": {
                          "stage": "cli", "message": f"{type(exc).__name__}: {_first_line(exc)}"}}}
        bar.total = max(bar.total, result["processed"] + result["failed"])
        bar.finish(result["processed"] + result["failed"])
    if result["status"] not in ("completed", "partial"):
        sys.stdout.flush()
        sys.stderr.flush()
        section = ""
        if log_path is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                f.seek(start)
                section = f.read()
        screen.write(f"  {market.code} {result['status'] or 'did not run'}; cause:\n")
        for line in failure_cause(result, section):
            screen.write(f"    {line}\n")
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
        "  - replay a user:   make replay USER=<user id>  (recomputed from the audit trail: identical or a diff)\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: run MARKET [--date D] | demo."""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.cli")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one market's DAG once, in-process")
    run.add_argument("--market", required=True, help="exchange-calendars code, e.g. XNYS")
    run.add_argument("--date", default="", help="session date YYYY-MM-DD (default: the next session)")
    run.add_argument("--force", action="store_true", help="start a new calculation for that session")
    run.add_argument("--batch-size", type=int, default=None)
    sub.add_parser("demo", help="run every market's DAG once for its next session and print a table")
    args = parser.parse_args(argv)
    private_umask()  # the log tee and the task logs under .local: the owner's only
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if args.cmd == "run":
        try:
            market = get_market(args.market.upper())
            session = sessions.validate_session_date(market.code, args.date) if args.date else None
        except (UnknownMarketError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        codes, name = [market.code], f"run-{market.code}"
        kwargs: dict[str, Any] = {"force": args.force, "batch_size": args.batch_size}
    else:
        loaded = load_markets()
        for err in loaded.errors:
            print(f"warning: {err}", file=sys.stderr)
        codes, name, session, kwargs = [m.code for m in loaded.markets], "demo", None, {}
    with logs_to_file(name) as (screen, log_path):
        try:
            rows = [run_with_progress(screen, log_path, code, session, **kwargs) for code in codes]
        except Exception as exc:  # noqa: BLE001 - a person gets the cause and the log, not a traceback
            logging.getLogger(__name__).exception("%s stopped", name)
            screen.write(f"\nerror: {type(exc).__name__}: {_first_line(exc)}\n{_where_log(log_path)}")
            return 1
        screen.write("\n" + _table(rows) + "\n")
        for r in rows:
            cache_status = (r.get("metrics") or {}).get("cache_status")
            if cache_status in ("not warmed", "partially warmed"):
                screen.write(f"note: {r['market']}: Redis cache {cache_status} (Redis unreachable?); the dashboard "
                             "reads Postgres meanwhile; once Redis is back: airflow dags trigger overnight_cache_warmer\n")
        screen.write(_where_next())
        screen.write(_where_log(log_path))
    return 0 if all(r["status"] in ("completed", "partial") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
