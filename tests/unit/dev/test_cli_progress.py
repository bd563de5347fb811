"""The progress line and the failure cause `make demo` / `make run` print (pure functions)."""

from __future__ import annotations

from datetime import date

import pytest

from overnight.dev import cli

DAY = date(2026, 12, 1)


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "bar", "finished", "line"),
    [
        pytest.param(0, 270, 0.0, True, False, "XNYS  2026-12-01 [------------------------] 0/270 users  0 users/s  ETA -",
                     id="tty-start"),
        pytest.param(90, 360, 3.0, True, False,
                     "XNYS  2026-12-01 [######------------------] 90/360 users  30 users/s  ETA 9 s", id="tty-quarter"),
        pytest.param(12_000, 12_000, 8.0, True, True,
                     "XNYS  2026-12-01 [########################] 12,000/12,000 users  1,500 users/s  done in 8.0 s",
                     id="tty-done"),
        pytest.param(270, 270, 2.5, False, True, "XNYS  2026-12-01 270/270 users  108 users/s  done in 2.5 s",
                     id="pipe-done-no-bar"),
        pytest.param(0, 0, 1.0, True, True,
                     "XNYS  2026-12-01 [########################] 0/0 users  0 users/s  done in 1.0 s", id="nobody-served"),
    ],
)
def test_progress_line(done: int, total: int, elapsed: float, bar: bool, finished: bool, line: str) -> None:
    assert cli.progress_line("XNYS", DAY, done, total, elapsed, bar=bar, finished=finished) == line


@pytest.mark.parametrize(
    ("result", "log", "cause"),
    [
        pytest.param({"errors": {"run": {"stage": "fetch_rates", "message": "rates provider failed"}}}, "",
                     ["fetch_rates: rates provider failed"], id="job-run-error"),
        pytest.param({"errors": {"users": [{"userId": "u1", "stage": "load", "message": "quantity < 0"}],
                                 "batches": ["users 1-500 of 900"]}}, "",
                     ["user u1 (load): quantity < 0", "batches not finished: users 1-500 of 900"], id="users-and-batches"),
        pytest.param({"errors": None},
                     "2026-12-01 [info     ] fine\n2026-12-01 [error    ] Task failed: boom\n"
                     "AirflowFailException: overnight run failed\n2026-12-01 [error    ] Task failed: boom\n",
                     ["2026-12-01 [error    ] Task failed: boom", "AirflowFailException: overnight run failed"],
                     id="from-the-log-deduplicated"),
        pytest.param({}, "all quiet\n", ["no error recorded; see the full log"], id="nothing-found"),
    ],
)
def test_failure_cause(result: dict, log: str, cause: list[str]) -> None:
    assert cli.failure_cause(result, log) == cause


def test_old_logs_are_pruned_per_command(tmp_path) -> None:
    names = [f"demo-20261201T0{i}0000Z.log" for i in range(5)] + ["run-XNYS-20261201T000000Z.log"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = cli.prune_logs(tmp_path, "demo", keep=3)
    assert [p.name for p in removed] == names[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
