"""The allocation policy's invariants (docs/allocation.md) on the documents the night's calculation step writes.

Hypothesis builds a batch in memory (assets in several currencies, GBp quotes, exchange rates with many digits,
holdings that cannot be valued) and a user, and runs them through `calculate.calculate_chunk`, the step
`pipeline.score_batch` calls between loading and writing: no database. Each property is a sentence of the policy
checked on the stored document's JSON, not a re-derivation of the code's formula; the class values the checks
need are worked out here exactly (fractions), from the policy's words: quantity x price, converted at the rates.
The same inputs in another order (holdings, watchlist, targets and assets come from the database unordered) must
give the same document, byte for byte.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from decimal import Decimal as D
from fractions import Fraction as F

from hypothesis import given, settings
from hypothesis import strategies as st

from overnight.adapters.providers.base import PriceQuote, RatesSnapshot, normalize_quote
from overnight.domain.money import minor_unit
from overnight.domain.recommendations import PER_CLASS, Target
from overnight.night import calculate, jobrun

CLASSES = ["Stocks", "Bonds", "ETFs", "REITs"]
MARKETS = ["XNYS", "XLON", "BVMF", "XTKS"]
BASES = ["USD", "JPY", "KWD", "BRL", "GBP"]
QUOTED_IN = ["USD", "JPY", "KWD", "BRL", "GBP", "GBp", "ARS"]  # ARS: no exchange rate in the run
GRADES = [D(-1), D("-0.5"), D(0), D("0.5"), D(1), D(2), D(3)]
RULES = [{"metric": "grade", "op": "==", "value": str(g), "points": str(g)} for g in GRADES]  # score = grade
AS_OF = datetime(2026, 11, 30, 21, tzinfo=UTC)
GENERATED = datetime(2026, 12, 1, 3, tzinfo=UTC)
JOB = jobrun.JobRun("job-1", "corr-1", "XNYS", "2026-11-30", "2026-12-01T03:00:00+00:00")
USER = "00000000-0000-4000-8000-000000000001"


def _decimal(draw, lo: int, hi: int, places: int) -> D:
    return D(draw(st.integers(lo, hi))).scaleb(-places)


def _mostly(draw, tenths: int) -> bool:
    """True `tenths` times in ten (hypothesis draws small integers often: this keeps the mix)."""
    return draw(st.integers(0, 9)) < tenths


def _amount(draw, lo: int, hi: int, places: int) -> D:
    """An amount between `lo` and `hi` with `places` decimals (nine times in ten), else zero."""
    return _decimal(draw, lo * 10**places, hi * 10**places, places) if _mostly(draw, 9) else D(0)


@st.composite
def worlds(draw):
    """(assets, quotes, rates, user, run contribution, score floor): one user's night."""
    rates = {"USD": D(1),  # 1 USD = rate units, with the many digits of a reference rate
             "JPY": _decimal(draw, 100_000_000, 200_000_000, 6), "KWD": _decimal(draw, 2_000_000, 4_000_000, 7),
             "BRL": _decimal(draw, 4_000_000, 6_000_000, 6), "GBP": _decimal(draw, 7_000_000, 9_000_000, 7)}
    symbols = draw(st.lists(st.text("ABCDEFGHJK", min_size=1, max_size=3), min_size=1, max_size=12, unique=True))
    assets, quotes = {}, {}
    for i, symbol in enumerate(symbols, 1):
        currency = draw(st.sampled_from(QUOTED_IN))
        grade = draw(st.sampled_from(GRADES[4:] if _mostly(draw, 7) else GRADES))  # mostly above the floor
        assets[i] = jobrun.AssetRow(i, symbol, draw(st.sampled_from(MARKETS)), draw(st.sampled_from(CLASSES)),
                                    currency, {"grade": grade})
        if _mostly(draw, 9):  # one asset in ten has no price
            price = _decimal(draw, 1, 10**8, 4)  # up to 10,000 (pence, yen, dollars...) with four decimals
            value, code = normalize_quote(price, currency)  # what the price provider stores: GBp -> GBP / 100
            quotes[symbol] = PriceQuote(symbol, value, code, AS_OF)
    held = draw(st.lists(st.sampled_from(list(assets)), unique=True, max_size=6))
    holdings = [(aid, _amount(draw, 1, 10_000, draw(st.integers(0, 6)))) for aid in held]  # 0 is no holding
    watchlist = draw(st.lists(st.sampled_from(list(assets)), unique=True, max_size=8))
    targets, room = [], 100
    for name in draw(st.lists(st.sampled_from(CLASSES), unique=True, min_size=int(_mostly(draw, 9)), max_size=4)):
        lo = draw(st.integers(0, room))
        hi = draw(st.integers(lo, 100))
        room -= lo
        targets.append(Target(name, D(lo), D(hi)))
    base = draw(st.sampled_from(BASES))
    markets = MARKETS if _mostly(draw, 7) else draw(st.lists(st.sampled_from(MARKETS), min_size=1, unique=True))
    user = jobrun.UserRow(USER, base, _amount(draw, 10, 10**6, 4), markets, "k", holdings, watchlist, targets)
    run_contribution = None
    if draw(st.booleans()):  # the run's contribution, in any currency, with that currency's decimals
        currency = draw(st.sampled_from(BASES))
        unit = minor_unit(currency)
        run_contribution = jobrun.Contribution(_amount(draw, 10, 10**6, -unit.as_tuple().exponent), currency)
    floor = draw(st.sampled_from([D(0), D(0), D(1), D("-1")]))
    rates_snapshot = RatesSnapshot("USD", rates, AS_OF, "test")
    return assets, quotes, rates_snapshot, user, run_contribution, floor


def _document(world) -> str:
    """The document's JSON as `calculate_chunk` makes it for storage (Redis, recommendation_history)."""
    assets, quotes, rates, user, contribution, floor = world
    batch = calculate.Batch(JOB, rates, assets, {"k": ("criteria-1", 1, RULES)}, quotes, contribution,
                            score_floor=floor, completed_at={USER: GENERATED})
    results, failures = calculate.calculate_chunk([user], batch)
    assert failures == []
    (result,) = results
    assert json.loads(result.document_json) == result.document
    return result.document_json


def _exact(amount: D | str) -> F:
    return F(D(amount))


def _class_values(world) -> dict[str, F]:
    """Each class's holdings valued in the base currency (docs/allocation.md: quantity x price, converted at the
    run's rates; a holding without a price or a rate is left out)."""
    assets, quotes, rates, user, _, _ = world
    out: dict[str, F] = {}
    for aid, qty in user.holdings:
        quote = quotes.get(assets[aid].symbol)
        if quote is None or quote.currency not in rates.rates:
            continue
        value = _exact(qty) * _exact(quote.price) / _exact(rates.rates[quote.currency]) * _exact(
            rates.rates[user.base_currency])
        out[assets[aid].class_name] = out.get(assets[aid].class_name, F(0)) + value
    return out


def _buyable_classes(world) -> set[str]:
    """Targeted classes with a candidate: an asset of the user's universe and markets, priced, with a rate,
    scored (its grade) above the floor."""
    assets, quotes, rates, user, _, floor = world
    targeted = {t.class_name for t in user.targets}
    universe = {aid for aid, _ in user.holdings} | set(user.watchlist)
    return {a.class_name for a in map(assets.get, universe)
            if a is not None and a.market in user.markets and a.symbol in quotes
            and quotes[a.symbol].currency in rates.rates and a.fundamentals["grade"] > floor
            and a.class_name in targeted}


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_the_stored_document_obeys_the_policy(world):
    assets, _, rates, user, given_contribution, floor = world
    doc = json.loads(_document(world))
    unit = minor_unit(user.base_currency)
    contribution = D(doc["totalInvestable"])
    recs = doc["recommendations"]
    unallocated = D(doc["unallocated"]["amount"])
    # amounts plus unallocated equal the contribution exactly; every amount positive and in the minor unit
    assert sum((D(r["amount"]) for r in recs), D(0)) + unallocated == contribution
    for text in [doc["totalInvestable"], doc["unallocated"]["amount"], *(r["amount"] for r in recs)]:
        assert D(text) >= 0 and D(text) == D(text).quantize(unit) and "E" not in text.upper(), text
    assert all(D(r["amount"]) > 0 and r["currency"] == user.base_currency for r in recs)
    # the contribution: the run's, converted and rounded down to the minor unit, or the user's own, rounded down
    if given_contribution is None:
        exact = _exact(user.default_contribution)
    else:
        exact = _exact(given_contribution.amount) / _exact(rates.rates[given_contribution.currency]) * _exact(
            rates.rates[user.base_currency])
    assert _exact(contribution) <= exact < _exact(contribution) + _exact(unit)
    # nothing scored at or below the floor is bought; only targeted classes, at most PER_CLASS assets each
    by_symbol = {a.symbol: a for a in assets.values()}
    targets = {t.class_name: t for t in user.targets}
    bought: dict[str, F] = {}
    for r in recs:
        asset = by_symbol[r["symbol"]]
        assert D(r["score"]) > floor and D(r["score"]) == asset.fundamentals["grade"], r
        assert r["assetId"] == str(asset.id) and asset.class_name in targets, r
        bought[asset.class_name] = bought.get(asset.class_name, F(0)) + _exact(r["amount"])
    assert len(recs) <= PER_CLASS * len(bought)
    # no class past its maximum; none past its minimum while a class with a candidate stays below its own
    values = _class_values(world)
    total_after = sum(values.values(), F(0)) + _exact(contribution)
    slack = PER_CLASS * _exact(unit)  # rounding moves a class by less than a unit per asset bought
    for name, money in bought.items():
        assert values.get(name, F(0)) + money <= _exact(targets[name].max_pct) * total_after / 100 + slack, name
    starving = [t.class_name for t in user.targets if t.class_name in _buyable_classes(world)
                and values.get(t.class_name, F(0)) + bought.get(t.class_name, F(0)) + slack
                < _exact(t.min_pct) * total_after / 100]
    if starving:
        for name, money in bought.items():
            need = max(F(0), _exact(targets[name].min_pct) * total_after / 100 - values.get(name, F(0)))
            assert money <= need + slack, (name, starving)
    # what no class could take is reported, with a reason
    assert (doc["unallocated"]["reason"] is None) == (unallocated == 0 and contribution > 0)


@settings(max_examples=100, deadline=None)
@given(worlds(), st.randoms(use_true_random=False))
def test_the_same_inputs_in_another_order_give_the_same_bytes(world, rnd: random.Random):
    assets, quotes, rates, user, contribution, floor = world
    first = _document(world)
    assert _document(world) == first  # once more, as it was
    holdings, watchlist, targets = user.holdings[:], user.watchlist[:], user.targets[:]
    for items in (holdings, watchlist, targets):
        rnd.shuffle(items)
    shuffled_assets = list(assets.items())
    rnd.shuffle(shuffled_assets)
    shuffled_quotes = list(quotes.items())
    rnd.shuffle(shuffled_quotes)
    again = jobrun.UserRow(user.id, user.base_currency, user.default_contribution, user.markets, user.criteria_key,
                           holdings, watchlist, targets)
    assert _document((dict(shuffled_assets), dict(shuffled_quotes), rates, again, contribution, floor)) == first
