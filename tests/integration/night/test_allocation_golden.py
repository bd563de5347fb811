"""Golden portfolios: hand-computed expected documents (tests/data/golden_portfolios.yaml) against the real
pipeline on a fresh Postgres database of their own. The oracle is the data file, worked out by hand from
docs/allocation.md: nothing here computes an expected amount."""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from overnight.domain import freshness
from overnight.night import jobrun, trail
from tests.conftest import RUN_ID
from tests.support import databases
from tests.support.pipeline_run import run_pipeline

GOLDEN = yaml.safe_load((Path(__file__).parents[2] / "data" / "golden_portfolios.yaml").read_text())
CASES = GOLDEN["cases"]
ALL_MARKETS = ["XNYS", "XTKS", "XLON", "BVMF"]
RUNS = {run: (date.fromisoformat(session), jobrun.Contribution(Decimal(GOLDEN["contributions"][run][0]),
                                                                GOLDEN["contributions"][run][1])
              if run in GOLDEN["contributions"] else None)
        for run, session in GOLDEN["sessions"].items()}
RUN_NOW = datetime.fromisoformat(GOLDEN["run_now"])
ASSET_IDS = {symbol: i for i, symbol in enumerate(GOLDEN["assets"], 1)}  # the ids _load_world gives the assets
NAMESPACE = uuid.UUID("6f1c1a52-4f0e-4c55-9d1e-0b6c6c1d7a01")


def _user_id(case_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, case_id))


def _load_world(conn: psycopg.Connection) -> None:
    """The golden world: classes, assets with prices and grades, rates, one criteria set, the investors."""
    classes = {name: int(cid) for cid, name in GOLDEN["classes"].items()}
    conn.cursor().executemany("INSERT INTO asset_classes (id, name) VALUES (%s, %s)", [(i, n) for n, i in classes.items()])
    for i, (symbol, (market, cls, currency, price, grade)) in enumerate(GOLDEN["assets"].items(), 1):
        conn.execute("INSERT INTO assets (id, symbol, name, market, class_id, currency, fundamentals)"
                     " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                     (i, symbol, symbol, market, classes[cls], currency, json.dumps({"grade": grade})))
        if price is not None:
            as_of = GOLDEN["as_of"].get(symbol, GOLDEN["price_as_of"])
            conn.execute("INSERT INTO prices (asset_id, price, currency, as_of) VALUES (%s, %s, %s, %s)",
                         (i, Decimal(price), currency, as_of))
    conn.cursor().executemany(
        "INSERT INTO exchange_rates (base, quote, rate, as_of, source) VALUES ('USD', %s, %s, %s, 'golden')",
        [(q, Decimal(r), GOLDEN["rates_as_of_by"].get(q, GOLDEN["rates_as_of"])) for q, r in GOLDEN["rates"].items()])
    earlier = uuid.uuid4()  # a job run of an earlier night, whose snapshot holds the quotes it used
    conn.execute("INSERT INTO overnight_job_runs (id, job_type, status, started_at, completed_at, correlation_id,"
                 " market, session_date) VALUES (%s, 'overnight-scoring', 'completed', '2026-11-20T12:00Z',"
                 " '2026-11-20T12:05Z', %s, 'XNYS', '2026-11-20')", (earlier, uuid.uuid4()))
    for symbol, (price, currency, as_of) in GOLDEN["earlier_job_prices"].items():
        conn.execute("INSERT INTO overnight_job_prices (job_run_id, symbol, price, currency, as_of, source)"
                     " VALUES (%s, %s, %s, %s, %s, 'golden')", (earlier, symbol, Decimal(price), currency, as_of))
    rules = [{"metric": "grade", "op": "==", "value": g, "points": g} for g in (-1, 0, 1, 2, 3)]
    conn.execute("INSERT INTO criteria_sets (id, criteria_key, version, name, rules) VALUES (%s, 'golden', 1,"
                 " 'grade', %s)", (uuid.uuid4(), json.dumps(rules)))
    ids = ASSET_IDS
    for case in CASES:
        uid = _user_id(case["id"])
        conn.execute("INSERT INTO users (id, email, base_currency, default_contribution, markets, criteria_key)"
                     " VALUES (%s, %s, %s, %s, %s, 'golden')",
                     (uid, f"{case['id']}@golden.test", case.get("base", "USD"), case.get("contribution"),
                      case.get("markets", ALL_MARKETS)))
        for symbol, qty in (case.get("holdings") or {}).items():
            conn.execute("INSERT INTO holdings VALUES (%s, %s, %s)", (uid, ids[symbol], Decimal(qty)))
        for symbol in case.get("watchlist") or []:
            conn.execute("INSERT INTO watchlist VALUES (%s, %s)", (uid, ids[symbol]))
        for cls, (lo, hi) in (case.get("targets") or {}).items():
            conn.execute("INSERT INTO allocation_targets VALUES (%s, %s, %s, %s)", (uid, classes[cls], lo, hi))
    conn.commit()


@pytest.fixture(scope="module")
def golden() -> Any:
    """Runs the pipeline over the golden investors; yields (documents and portfolios, events, runs by name)."""
    name = f"ovt_{RUN_ID}_golden"
    dsn = databases.clone(databases.app_template(), name)
    runs = {}

    def judge_prices(quotes):  # the DAG's judge (runtime.score_batch), at the golden run's moment
        return freshness.judge_quotes(quotes, RUN_NOW, freshness.DEFAULT_MAX_PRICE_LAG_SESSIONS)
    try:
        with psycopg.connect(dsn) as conn:
            _load_world(conn)
            for run, (session, contribution) in RUNS.items():
                users = tuple(_user_id(c["id"]) for c in CASES if c.get("run", "default") == run)
                runs[run] = run_pipeline(conn, GOLDEN["market"], session, f"golden-{run}", user_ids=users,
                                         earlier=(), rates_now=RUN_NOW, contribution=contribution,
                                         judge_prices=judge_prices)
            docs = {str(u): (d, p) for u, d, p in conn.execute("SELECT user_id, document, portfolio FROM recommendations")}
            events = {(u, t): payload for (corr,) in conn.execute("SELECT correlation_id::text FROM overnight_job_runs")
                      .fetchall() for u, _, t, payload, _ in trail.read_calculated(conn, corr)}  # as calculated
        yield docs, events, runs
    finally:
        databases.drop(name)


def inputs_ok(inputs: dict[str, Any], case: dict[str, Any]) -> bool:
    """The audit event says the same about the rates as the document."""
    return inputs["ratesStale"] is case.get("ratesStale", False)


def test_every_golden_investor_is_calculated_none_failed(golden):
    _, _, runs = golden
    summaries = {run: r.summary for run, r in runs.items()}
    assert len(CASES) >= 15
    for run, summary in summaries.items():
        expected = sum(1 for c in CASES if c.get("run", "default") == run)
        assert (summary["status"], summary["users_processed"], summary["users_failed"]) == ("completed", expected, 0), run
    # the investors with unpriced holdings are calculated, with a warning
    assert summaries["default"]["users_with_warnings"] == sum(
        1 for c in CASES if "unpricedHoldings" in c["expect"] or "lastKnownPrices" in c["expect"])
    assert summaries["default"]["rates_stale"] is True  # the run as a whole used a stale rate (JPY)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_document(golden, case):
    docs, events, runs = golden
    uid = _user_id(case["id"])
    doc, portfolio = docs[uid]
    want = case["expect"]
    base = case.get("base", "USD")
    run = case.get("run", "default")
    optional = {"lastKnownPrices"} if "lastKnownPrices" in want else set()
    assert set(doc) == set(GOLDEN["documentKeys"]) | optional, "the document's keys: none missing, none unexpected"
    assert doc["userId"] == uid
    assert (doc["market"], doc["sessionDate"]) == (GOLDEN["market"], GOLDEN["sessions"][run])
    assert doc["correlationId"] == runs[run].job.correlation_id
    assert datetime.fromisoformat(doc["generatedAt"]).utcoffset() is not None
    for r in doc["recommendations"]:
        assert set(r) == set(GOLDEN["recommendationKeys"]), r["symbol"]
        assert r["assetId"] == str(ASSET_IDS[r["symbol"]]), r["symbol"]
        assert r["breakdown"] == GOLDEN["breakdown"], r["symbol"]
    got_recs = [[r["symbol"], r["score"], r["amount"], r["allocationGap"], r["allocationGapAfter"]]
                for r in doc["recommendations"]]
    assert got_recs == want["recommendations"], "recommendations: [symbol, score, amount, gap, gap after]"
    assert {r["currency"] for r in doc["recommendations"]} <= {base}
    amount, reason, *message = want["unallocated"]
    assert doc["unallocated"] == {"amount": amount, "reason": reason, "message": message[0] if message else None}
    if "totalInvestable" in want:
        assert doc["totalInvestable"] == want["totalInvestable"]
    else:
        assert doc["totalInvestable"] == case.get("contribution")
    assert doc["portfolioSummary"] == {"totalValue": want["totalValue"], "baseCurrency": base,
                                       "allocations": want["allocations"]}
    assert doc["unpricedHoldings"] == want.get("unpricedHoldings", [])
    assert doc.get("lastKnownPrices") == want.get("lastKnownPrices")
    assert events[(uid, "INPUTS_CAPTURED")].get("lastKnownPrices") == want.get("lastKnownPrices")  # for the replay
    assert doc["ratesStale"] is case.get("ratesStale", False)
    assert inputs_ok(events[(uid, "INPUTS_CAPTURED")], case)
    assert doc["stalePrices"] == want.get("stalePrices", [])
    assert set(doc["dataFreshness"]) == set(GOLDEN["dataFreshnessKeys"])
    assert doc["dataFreshness"]["pricesAsOf"] == want.get("pricesAsOf", GOLDEN["price_as_of"])
    assert doc["dataFreshness"]["criteriaVersion"] == GOLDEN["criteriaVersion"]
    assert portfolio == {
        "totalValue": want["totalValue"], "assetCount": want["assetCount"],
        "allocations": [{"className": n, "currentPercent": p, "targetMin": lo, "targetMax": hi}
                        for n, p, lo, hi in want["portfolio"]],
    }
    scored = events[(uid, "SCORES_COMPUTED")]
    assert scored == {"scores": want["scores"], "unscored": want.get("unscored", {})}
    inputs = events[(uid, "INPUTS_CAPTURED")]
    # the oldest rate the document's own conversions used: Friday's JPY for those who converted yen (exactly the
    # ratesStale ones: JPY is the run's one old rate), Monday's for the others (the run's newest when none)
    want_rates_as_of = GOLDEN["rates_as_of_by"]["JPY"] if case.get("ratesStale") else GOLDEN["rates_as_of"]
    assert doc["dataFreshness"]["ratesAsOf"] == inputs["ratesAsOf"] == want_rates_as_of
    assert inputs["contribution"] == doc["totalInvestable"]
    assert inputs.get("stalePrices", []) == want.get("stalePrices", [])  # the night's judgement, for the replay
    if run in GOLDEN["contributions"]:
        amount_given, currency_given = GOLDEN["contributions"][run]
        assert inputs["contributionGiven"] == {"amount": amount_given, "currency": currency_given}
    else:
        assert "contributionGiven" not in inputs
    assert events[(uid, "CALC_COMPLETED")]["unallocated"] == amount
