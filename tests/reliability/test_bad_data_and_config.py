"""Bad data and bad configuration.

- Several bad users at once in one dag.test() run: the run is partial, each bad user is named in
  error_details with its stage and reason, everyone else completes.
- Bad markets.yaml entries (unknown code, duplicate, negative lead), bad run parameters (not a session,
  batch_size 0, unknown keys, ...) and bad command lines: a clear error, nothing written.
- The trigger form's `contribution`: its schema takes an amount with its currency and refuses anything else
  naming the problem (and the run refuses it too, for conf that skips the form); its description says how the
  amount is converted.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from overnight.dev import cli, seed
from overnight.domain.markets import get_market, load_markets
from overnight.night import runtime
from tests.support import reliability as R

MARKET = "XNYS"
SESSION = R.S_BAD_DATA


def _counts(conn: psycopg.Connection) -> tuple[int, ...]:
    return conn.execute(
        "SELECT (SELECT count(*) FROM overnight_job_runs), (SELECT count(*) FROM calculation_events),"
        " (SELECT count(*) FROM overnight_job_users), (SELECT count(*) FROM recommendations),"
        " (SELECT count(*) FROM users)").fetchone()


def test_several_bad_users_at_once_in_a_dag_run(pg_dsn, seeded, airflow_db) -> None:
    with psycopg.connect(pg_dsn) as conn:
        served = sorted(R.served(conn, MARKET, SESSION))
        holdings: dict[str, set[int]] = {}
        for u, a in conn.execute("SELECT user_id::text, asset_id FROM holdings"):
            holdings.setdefault(u, set()).add(a)
        key_of = dict(conn.execute("SELECT id::text, criteria_key FROM users").fetchall())
        served_set = set(served)
        pool = [u for u in served if holdings.get(u)]
        nan_user = pool[0]
        nan_asset = min(holdings[nan_user])
        nan_holders = {u for u in served_set if nan_asset in holdings.get(u, set())}
        crit_user = next(u for u in pool if u not in nan_holders)
        crit_sharers = {u for u in served_set if key_of[u] == key_of[crit_user]}
        taken = nan_holders | crit_sharers
        others = [u for u in pool if u not in taken][:4]
        assert len(others) == 4
        neg, null, cur, tgt = others
        bad = {
            neg: ("load", "not a non-negative", "UPDATE holdings SET quantity = -5 WHERE user_id = %(u)s"),
            null: ("load", "quantity is missing", "UPDATE holdings SET quantity = NULL WHERE user_id = %(u)s"),
            cur: ("currency", "XXX has no minor unit", "UPDATE users SET base_currency = 'XXX' WHERE id = %(u)s"),
            tgt: ("targets", "more than 100",
                  "UPDATE allocation_targets SET min_pct = 30, max_pct = 90 WHERE user_id = %(u)s"),
            crit_user: ("criteria", "unknown op",
                        "INSERT INTO criteria_sets (id, criteria_key, version, name, rules) SELECT gen_random_uuid(),"
                        " criteria_key, 99, 'broken', '[{\"metric\": \"pe_ratio\", \"op\": \"~~\"}]' FROM users"
                        " WHERE id = %(u)s"),
        }
        for u, (_, _, sql) in bad.items():
            conn.execute(sql, {"u": u, "a": nan_asset})
        # a price gone bad does not fail its holders: they are calculated, the holding named as unpriced
        conn.execute("UPDATE prices SET price = 'NaN' WHERE asset_id = %s", (nan_asset,))
        nan_symbol = conn.execute("SELECT symbol FROM assets WHERE id = %s", (nan_asset,)).fetchone()[0]
        known = conn.execute("SELECT 1 FROM overnight_job_prices WHERE symbol = %s LIMIT 1", (nan_symbol,)).fetchone()
        conn.commit()
        expected_failed = set(bad) | crit_sharers
        try:
            result = cli.run_market(MARKET, SESSION, quiet=True, batch_size=100)
            out = R.check_invariants(conn, MARKET, SESSION)
            docs = {str(u): d for u, d in conn.execute(
                "SELECT user_id, document FROM recommendations WHERE user_id = ANY(%s::uuid[])",
                (sorted(nan_holders - expected_failed),))}
        finally:
            conn.rollback()
            seed.seed(conn, 600, 7, dsn=pg_dsn)  # restore the shared data set
    assert result["dag_run_state"].endswith("success"), result
    assert out.status == "partial"
    assert set(out.failed) == expected_failed
    assert out.completed == served_set - expected_failed and out.completed
    named = {e["userId"]: e for e in out.error_details["users"]}
    assert set(named) == expected_failed
    for u, (stage, message, _) in bad.items():
        assert named[u]["stage"] == stage and message in named[u]["message"], (u, named[u])
    assert all(named[u]["message"] for u in named)
    assert nan_holders - expected_failed and set(docs) == nan_holders - expected_failed
    for u, doc in docs.items():  # valued at the newest price an earlier job run used, or named with no advice
        if known:
            assert nan_symbol in {k["symbol"] for k in doc["lastKnownPrices"]}, (u, doc.get("lastKnownPrices"))
        else:
            assert {"symbol": nan_symbol, "reason": "no price known"}.items() <= next(
                i for i in doc["unpricedHoldings"] if i["symbol"] == nan_symbol).items(), (u, doc["unpricedHoldings"])
            assert doc["unallocated"]["reason"] == "portfolio_unpriced"


# --------------------------------------------------------------------------- markets.yaml


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        pytest.param("  - code: XXXX\n", ["XXXX", "code"], id="unknown-code"),
        pytest.param("  - code: XLON\n", ["XLON", "duplicate"], id="duplicate"),
        pytest.param("  - code: BVMF\n    lead: \"-2h\"\n", ["BVMF", "lead"], id="negative-lead"),
        pytest.param("  - code: XTKS\n    lead: 25h\n", ["XTKS", "lead"], id="lead-over-a-day"),
        pytest.param("  - code: XTKS\n    batch_size: 0\n", ["XTKS", "batch_size"], id="batch-size-0"),
        pytest.param("  - code: \"'; DROP TABLE users;--\"\n", ["code"], id="hostile-code"),
    ],
)
def test_bad_markets_yaml_entry_is_named_and_the_valid_markets_still_load(tmp_path: Path, entry, words) -> None:
    path = tmp_path / "markets.yaml"
    path.write_text("markets:\n  - code: XNYS\n  - code: XLON\n" + entry)
    loaded = load_markets(path)
    assert {"XNYS", "XLON"} <= set(loaded.codes)
    assert len(loaded.errors) == 1, loaded.errors
    text = str(loaded.errors[0])
    assert all(w.lower() in text.lower() for w in words), text


# --------------------------------------------------------------------------- run parameters


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        pytest.param({"session_date": "2026-12-25"}, "not a XNYS session", id="holiday"),
        pytest.param({"session_date": "2027-01-09"}, "not a XNYS session", id="saturday"),
        pytest.param({"session_date": "2027-01-05", "batch_size": 0}, "batch_size", id="batch-size-0"),
        pytest.param({"session_date": "2027-01-05", "batch_size": "50"}, "batch_size", id="batch-size-text"),
        pytest.param({"session_date": "2027-01-05", "batch_size": True}, "batch_size", id="batch-size-bool"),
        pytest.param({"session_date": "2027-01-05", "contribution": {"amount": "-5", "currency": "USD"}},
                     "contribution: 'amount' must be a non-negative amount", id="negative-contribution"),
        pytest.param({"session_date": "2027-01-05", "contribution": "1500"},
                     "contribution: expected an amount with its currency such as .*a bare number is ambiguous",
                     id="bare-number-contribution"),
        pytest.param({"session_date": "2027-01-05", "contribution": {"amount": "1500"}},
                     "contribution: 'currency' must be a 3-letter ISO 4217 code", id="contribution-without-currency"),
        pytest.param({"session_date": "2027-01-05", "contribution": {"amount": "1500", "currency": "ZZZ"}},
                     "contribution: currency 'ZZZ' is not an ISO 4217 code", id="contribution-unknown-currency"),
        pytest.param({"session_date": "2027-01-05", "contribution": {"amount": "1500.5", "currency": "JPY"}},
                     r"contribution: 'amount' 1500.5 has more decimals than JPY has \(0\)", id="yen-with-decimals"),
        pytest.param({"session_date": "2027-01-05", "contribution": {"amount": "15", "currency": "XAU"}},
                     "contribution: currency XAU has no minor unit", id="contribution-in-gold"),
        pytest.param({"session_date": "2027-01-05", "contribution": {"amount": "1", "currency": "USD", "x": 1}},
                     r"contribution: unknown keys \['x'\]", id="contribution-extra-key"),
        pytest.param({"session_date": "2027-01-05", "force": "yes"}, "force", id="force-text"),
        pytest.param({"session_date": "2027-01-05", "user_ids": "abc"}, "user_ids", id="user-ids-not-a-list"),
        pytest.param({"session_date": "2027-01-05", "sesion_date": "x"}, "unknown --conf keys", id="unknown-key"),
    ],
)
def test_bad_params_are_refused_naming_the_problem(conf, message) -> None:
    with pytest.raises(runtime.ParamError, match=message) as info:
        runtime.validate_params(get_market(MARKET), {}, conf, interval_end=None, run_after=None)
    assert "overnight_scoring_xnys: bad parameters" in str(info.value)


@pytest.mark.parametrize(
    ("given", "amount", "currency"),
    [
        pytest.param({"amount": "1500", "currency": "USD"}, "1500", "USD", id="dollars"),
        pytest.param({"amount": 200000, "currency": "JPY"}, "200000", "JPY", id="yen-as-a-number"),
        pytest.param({"amount": "12.345", "currency": "KWD"}, "12.345", "KWD", id="dinar-three-decimals"),
    ],
)
def test_a_contribution_with_its_currency_is_accepted(given, amount, currency) -> None:
    run = runtime.validate_params(get_market(MARKET), {}, {"session_date": "2027-01-05", "contribution": given},
                                  interval_end=None, run_after=None)
    assert run.contribution is not None
    assert (str(run.contribution.amount), run.contribution.currency) == (amount, currency)
    assert runtime.RunParams.from_xcom(run.to_xcom()) == run  # it crosses XCom unchanged


def test_several_bad_params_are_all_named_at_once() -> None:
    with pytest.raises(runtime.ParamError) as info:
        runtime.validate_params(get_market(MARKET), {}, {"session_date": "2026-12-25", "batch_size": 0,
                                                         "force": "yes", "extra": 1},
                                interval_end=None, run_after=None)
    for word in ("session_date", "batch_size", "force", "unknown --conf keys"):
        assert word in str(info.value)


@pytest.fixture(scope="module")
def contribution_param():
    """The market DAG's `contribution` param, as the trigger form and the REST API validate it."""
    return cli._load_dag("overnight_scoring_xnys").params.get_param("contribution")


def test_the_trigger_form_explains_the_contribution_and_its_currency(contribution_param) -> None:
    param = contribution_param
    assert param.value is None  # empty: each user's own default contribution
    assert param.schema["type"] == ["null", "object"]
    assert set(param.schema["properties"]) == set(param.schema["required"]) == {"amount", "currency"}
    assert param.schema["additionalProperties"] is False
    assert "currency" in param.schema["title"].lower()
    text = " ".join(param.description.split())
    for words in ('{"amount": "1500", "currency": "USD"}', "converted at the run's exchange rates",
                  "each user's base currency", "rounded down to its minor unit", "each user's own default"):
        assert words in text, words


@pytest.mark.parametrize(
    "value",
    [pytest.param(None, id="empty"), pytest.param({"amount": "1500", "currency": "USD"}, id="dollars"),
     pytest.param({"amount": "200000", "currency": "JPY"}, id="yen"),
     pytest.param({"amount": 200000, "currency": "JPY"}, id="yen-as-a-whole-number"),
     pytest.param({"amount": "12.345", "currency": "KWD"}, id="dinar-three-decimals")],
)
def test_the_trigger_form_accepts_an_amount_with_its_currency(contribution_param, value) -> None:
    assert copy.deepcopy(contribution_param).resolve(value) == value
    if value is not None:  # and the run accepts what the form let through
        run = runtime.validate_params(get_market(MARKET), {}, {"session_date": "2027-01-05", "contribution": value},
                                      interval_end=None, run_after=None)
        assert run.contribution is not None and run.contribution.to_json() == {**value, "amount": str(value["amount"])}


@pytest.mark.parametrize(
    ("value", "form", "run"),
    [  # (what is given, what the form says, what the run says if it gets past the form, e.g. from the CLI)
        pytest.param("1500", "'1500' is not of type 'null', 'object'", "a bare number is ambiguous", id="bare-text"),
        pytest.param(1500, "1500 is not of type 'null', 'object'", "a bare number is ambiguous", id="bare-number"),
        pytest.param({"amount": "1500"}, "'currency' is a required property", "'currency' must be a 3-letter",
                     id="no-currency"),
        pytest.param({"currency": "USD"}, "'amount' is a required property", "'amount' must be a non-negative",
                     id="no-amount"),
        pytest.param({"amount": "-5", "currency": "USD"}, "'-5' does not match", "'amount' must be a non-negative",
                     id="negative"),
        pytest.param({"amount": -5, "currency": "USD"}, "-5 is less than the minimum of 0",
                     "'amount' must be a non-negative", id="negative-number"),
        pytest.param({"amount": 1.5, "currency": "USD"}, "1.5 is not of type 'string', 'integer'",
                     "'amount' must be a non-negative", id="fractional-number"),
        pytest.param({"amount": "1,500", "currency": "USD"}, "'1,500' does not match",
                     "'amount' must be a non-negative", id="thousands-separator"),
        pytest.param({"amount": "1500", "currency": "usd"}, "'usd' does not match", "'currency' must be a 3-letter",
                     id="lower-case-currency"),
        pytest.param({"amount": "1500", "currency": "USD", "x": 1}, "('x' was unexpected)", r"unknown keys ['x']",
                     id="extra-key"),
    ],
)
def test_the_trigger_form_refuses_a_bad_contribution_naming_the_problem(contribution_param, value, form, run) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=re.escape(form)):
        copy.deepcopy(contribution_param).resolve(value)
    with pytest.raises(runtime.ParamError, match="contribution: .*" + re.escape(run)):
        runtime.validate_params(get_market(MARKET), {}, {"session_date": "2027-01-05", "contribution": value},
                                interval_end=None, run_after=None)


@pytest.mark.parametrize(
    ("conf", "refused"),
    [pytest.param({"session_date": "2027-01-05", "batch_size": 0},
                  ("schema", "Invalid input for param batch_size: 0 is less than the minimum of 1"), id="batch-size-0"),
     pytest.param({"session_date": "2027-01-05", "force": "yes"},
                  ("schema", "Invalid input for param force: 'yes' is not of type 'boolean'"), id="force-text")],
)
def test_bad_params_in_a_dag_run_write_nothing(pg_dsn, seeded, airflow_db, monkeypatch, conf, refused) -> None:
    from tests.support.airflow_dags import refusal

    dag = cli._load_dag("overnight_scoring_xnys")
    with psycopg.connect(pg_dsn) as conn:
        before = _counts(conn)
    assert refusal(dag, conf, monkeypatch) == refused
    with psycopg.connect(pg_dsn) as conn:
        assert _counts(conn) == before


@pytest.mark.parametrize(("name", "value", "message"), [
    pytest.param("OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "5 days",
                 "OVERNIGHT_MAX_PRICE_LAG_SESSIONS='5 days': expected a whole number of sessions from 0 to 260 (the "
                 "default is OVERNIGHT_MAX_PRICE_LAG_SESSIONS=5)", id="bad-lag"),
    # the hour setting it replaces is gone: a deployment still setting it is told what to set instead
    pytest.param("OVERNIGHT_MAX_RATES_AGE_HOURS", "72",
                 "OVERNIGHT_MAX_RATES_AGE_HOURS='72' is no longer read: lags are counted in ECB publications, not "
                 "hours; unset OVERNIGHT_MAX_RATES_AGE_HOURS and set OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS instead",
                 id="retired-hours"),
])
def test_a_bad_freshness_setting_fails_the_dag_run_at_its_first_task_naming_it(
        pg_dsn, seeded, airflow_db, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, name: str, value: str, message: str) -> None:
    # Not found mid-run (after the rates, or in every batch): the start task refuses it, nothing is written.
    monkeypatch.setenv(name, value)
    dag = cli._load_dag("overnight_scoring_xnys")
    with psycopg.connect(pg_dsn) as conn:
        before = _counts(conn)
    dag_run = dag.test(run_conf={"session_date": SESSION.isoformat()})
    assert str(dag_run.state).endswith("failed")
    states = {t.task_id: str(t.state).rsplit(".", 1)[-1] for t in dag_run.get_task_instances()}
    assert states["start"] == "failed" and states["fetch_rates"] == "upstream_failed", states
    out = capfd.readouterr()
    said = out.out + out.err + caplog.text
    assert message in said
    with psycopg.connect(pg_dsn) as conn:
        assert _counts(conn) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--market", "XXXX"], "XXXX", id="unknown-market"),
        pytest.param(["--market", "XNYS", "--date", "2026-12-25"], "not a XNYS session", id="holiday"),
        pytest.param(["--market", "XNYS", "--date", "25/12/2026"], "2026", id="malformed-date"),
        pytest.param(["--market", "'; DROP TABLE users;--"], "DROP TABLE", id="hostile-market"),
    ],
)
def test_bad_command_lines_fail_fast_and_write_nothing(pg_dsn, seeded, args, message) -> None:
    with psycopg.connect(pg_dsn) as conn:
        before = _counts(conn)
    proc = subprocess.run([sys.executable, "-m", "overnight.dev.cli", "run", *args], env=R.subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=str(R.ROOT))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr
    with psycopg.connect(pg_dsn) as conn:
        assert _counts(conn) == before
