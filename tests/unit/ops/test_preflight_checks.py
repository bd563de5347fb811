"""The pure preflight checks: pools, calendar horizon, market DAGs' pause state and next run."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from overnight.domain import sessions
from overnight.domain.markets import Market
from overnight.ops import preflight

pytestmark = pytest.mark.filterwarnings("ignore:Series.values returning an ndarray")

XNYS = Market("XNYS")
XLON = Market("XLON", pool="lse_pool")
NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # a Tuesday, before any of the day's runs
XNYS_RUN = sessions.run_time("XNYS", timedelta(hours=2), date(2026, 11, 24))  # 12:30 UTC
XLON_RUN = sessions.run_time("XLON", timedelta(hours=2), date(2026, 11, 24))  # 06:00 UTC


def _ok(run: datetime) -> dict[str, Any]:
    return {"is_paused": False, "next_dagrun": run}


def test_required_pools_are_each_markets_scoring_pool() -> None:
    xtks = Market("XTKS")  # no pool in markets.yaml: the shared one
    assert preflight.required_pools([XNYS, XLON, xtks]) == {
        "overnight_scoring": ["overnight_scoring_xnys.score_batch", "overnight_scoring_xtks.score_batch"],
        "lse_pool": ["overnight_scoring_xlon.score_batch"],
    }


def test_the_shared_pool_is_the_one_include_pools_json_defines() -> None:
    # `airflow pools import include/pools.json` is what production runs: the file must create the default pool
    data = json.loads((Path(preflight.__file__).parents[2] / "pools.json").read_text())
    assert data == {"overnight_scoring": {"slots": 4, "description": data["overnight_scoring"]["description"],
                                          "include_deferred": False}}
    settings = yaml.safe_load((Path(preflight.__file__).parents[3] / "airflow_settings.yaml").read_text())
    assert [(p["pool_name"], p["pool_slot"]) for p in settings["airflow"]["pools"]] == [("overnight_scoring", 4)]


@pytest.mark.parametrize(
    ("existing", "missing"),
    [
        pytest.param(["default_pool", "overnight_scoring", "lse_pool"], [], id="all-there"),
        pytest.param(["default_pool"], ["lse_pool", "overnight_scoring"], id="two-missing"),
        pytest.param([], ["lse_pool", "overnight_scoring"], id="none"),
    ],
)
def test_check_pools(existing: list[str], missing: list[str]) -> None:
    required = {"overnight_scoring": ["overnight_scoring_xnys.score_batch"],
                "lse_pool": ["overnight_scoring_xlon.score_batch"]}
    lines = preflight.check_pools(required, existing)
    assert [line.split("'")[1] for line in lines] == missing
    fixes = {line.split("'")[1]: line for line in lines}
    if "overnight_scoring" in fixes:  # the packaged pool: the command production runs
        assert "create it with `airflow pools import pools.json`" in fixes["overnight_scoring"]
        assert "/opt/airflow/include/pools.json" in fixes["overnight_scoring"]
    if "lse_pool" in fixes:  # a pool only markets.yaml names: made by hand
        assert "create it with `airflow pools set lse_pool <slots> '<description>'`" in fixes["lse_pool"]
    for line in lines:
        assert "\n" not in line and "needed by overnight_scoring_x" in line


def test_check_horizon_warns_then_fails() -> None:
    horizon = sessions.calendar_horizon("XSHG")
    problems, warnings = preflight.check_horizon(["XSHG", "XNYS"], horizon - timedelta(days=30))
    assert problems == [] and len(warnings) == 1 and warnings[0].startswith("XSHG: ")
    problems, warnings = preflight.check_horizon(["XSHG"], horizon + timedelta(days=2))
    assert warnings == [] and len(problems) == 1 and "ended" in problems[0]
    assert preflight.check_horizon(["XSHG", "XNYS"], horizon - timedelta(days=90)) == ([], [])


@pytest.mark.parametrize(
    ("info", "now", "expected"),
    [
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN), "overnight_scoring_xlon": _ok(XLON_RUN)}, NOW, [],
                     id="both-on-time"),
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN.isoformat()), "overnight_scoring_xlon": _ok(XLON_RUN)},
                     NOW, [], id="iso-string"),
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN)}, NOW, ["overnight_scoring_xlon: not found"],
                     id="missing"),
        pytest.param({"overnight_scoring_xnys": {"is_paused": True, "next_dagrun": XNYS_RUN},
                      "overnight_scoring_xlon": _ok(XLON_RUN)}, NOW, ["overnight_scoring_xnys: paused"], id="paused"),
        pytest.param({"overnight_scoring_xnys": _ok(None), "overnight_scoring_xlon": _ok(XLON_RUN)}, NOW,
                     ["overnight_scoring_xnys: Airflow has no next run"], id="no-next-run"),
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN + timedelta(days=1)),
                      "overnight_scoring_xlon": _ok(XLON_RUN)}, NOW,
                     ["overnight_scoring_xnys: Airflow's next run is 2026-11-25 12:30 UTC but the XNYS calendar says "
                      "2026-11-24 12:30 UTC"], id="a-session-skipped"),
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN), "overnight_scoring_xlon": _ok(XLON_RUN)},
                     XLON_RUN + timedelta(minutes=5), [], id="just-due-within-grace"),
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN), "overnight_scoring_xlon": _ok(XLON_RUN)},
                     XLON_RUN + timedelta(hours=1), ["overnight_scoring_xlon: Airflow's next run is 2026-11-24 06:00"],
                     id="scheduler-behind"),
        pytest.param({"overnight_scoring_xnys": _ok(XNYS_RUN - timedelta(minutes=30)),
                      "overnight_scoring_xlon": _ok(XLON_RUN)}, NOW, ["overnight_scoring_xnys: Airflow's next run"],
                     id="stale-lead"),
    ],
)
def test_check_next_runs(info: dict[str, Any], now: datetime, expected: list[str]) -> None:
    lines = preflight.check_next_runs([XNYS, XLON], info, now)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), line
        assert "\n" not in line


def test_report_failure_message_has_one_line_per_problem() -> None:
    report = preflight.Report(problems=["a: down", "b: paused"])
    assert report.failure_message() == "preflight: 2 problem(s):\n- a: down\n- b: paused"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="nothing"),
        pytest.param({"OVERNIGHT_AIRFLOW_API_TOKEN": "t"}, None, id="token-without-url"),
        pytest.param({"OVERNIGHT_AIRFLOW_API_TOKEN": "t", "AIRFLOW__API__BASE_URL": "http://af:8080/"},
                     ("http://af:8080", "t", None, None), id="token-and-url"),
        pytest.param({"AIRFLOW_CONN_OVERNIGHT_AIRFLOW_API": "http://admin:pw@af:8080"},
                     ("http://af:8080", None, "admin", "pw"), id="connection-login"),
    ],
)
def test_api_access(env: dict[str, str], expected: tuple[Any, ...] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_AIRFLOW_API", raising=False)
    for key, value in env.items():
        if key.startswith("AIRFLOW_CONN_"):
            monkeypatch.setenv(key, value)
    assert preflight.api_access(env) == expected


def test_bad_freshness_settings_are_preflight_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found before the night, not mid-run: each bad setting is one problem line naming it and what to do.
    for name, reason in (("check_postgres", []), ("check_redis", [])):
        monkeypatch.setattr(preflight, name, lambda reason=reason: reason)
    monkeypatch.setattr(preflight, "check_http_providers", lambda: ([], []))
    monkeypatch.setenv("OVERNIGHT_FRESHNESS_GRACE_MINUTES", "2h")
    monkeypatch.setenv("OVERNIGHT_CACHE_TTL", "0")
    report = preflight.run_checks([XNYS], now=NOW)
    assert report.problems == [
        "OVERNIGHT_FRESHNESS_GRACE_MINUTES='2h': expected a finite number of minutes >= 0 (the default is "
        "OVERNIGHT_FRESHNESS_GRACE_MINUTES=120); fix it or unset it for the default",
        "OVERNIGHT_CACHE_TTL='0': expected a positive number of seconds or 'next-run' (unset for the default 24 h)",
    ]
    assert "- OVERNIGHT_CACHE_TTL='0'" in report.failure_message()
    monkeypatch.delenv("OVERNIGHT_FRESHNESS_GRACE_MINUTES")
    monkeypatch.delenv("OVERNIGHT_CACHE_TTL")
    assert preflight.run_checks([XNYS], now=NOW).problems == []
