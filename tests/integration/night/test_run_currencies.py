"""Every currency a run converts through is fetched, the run's contribution currency included (issue 22): the
DAG's `fetch_rates` (runtime.fetch_rates, as the task calls it) on a database of its own whose stored rates hold
CHF, which no asset trades in and no investor counts in. A currency no provider publishes is reported by name,
with the provider that was asked."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from overnight.domain.markets import get_market
from overnight.night import runtime
from tests.support import reliability as R

SESSION = "2027-02-02"  # a Tuesday of XNYS no other test uses


@pytest.fixture
def dsn(monkeypatch: pytest.MonkeyPatch):
    with R.scratch_database("currencies", users=50) as dsn:
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM assets WHERE currency = 'CHF'").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM users WHERE base_currency = 'CHF'").fetchone()[0] == 0
            conn.execute("INSERT INTO exchange_rates (base, quote, rate, as_of, source) VALUES ('USD', 'CHF', 0.9,"
                         " %s, 'test')", (datetime(2027, 2, 1, 15, tzinfo=UTC),))
        monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", dsn)
        monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", raising=False)
        yield dsn


def _rates(conf: dict) -> dict:
    market = get_market("XNYS")
    run = runtime.validate_params(market, {}, {"session_date": SESSION, "force": True, **conf},
                                  interval_end=None, run_after=None)
    job = runtime.start(market, run, "test-run-currencies")
    return runtime.fetch_rates(job, run.to_xcom())


def test_the_contribution_currency_is_fetched_and_nothing_else_changes(dsn: str) -> None:
    plain = _rates({})
    chf = _rates({"contribution": {"amount": "1500", "currency": "CHF"}})
    assert "CHF" not in plain["rates"] and Decimal(chf["rates"]["CHF"]) == Decimal("0.9")
    assert {k: v for k, v in chf["rates"].items() if k != "CHF"} == plain["rates"]


def test_a_currency_no_provider_publishes_is_named_with_the_provider_asked(dsn: str) -> None:
    sek = _rates({"contribution": {"amount": "1500", "currency": "SEK"}})
    assert "SEK" not in sek["rates"]
    assert sek["unavailable"]["SEK"] == "exchange_rates: no stored USD rate for SEK"  # the provider asked: the table
