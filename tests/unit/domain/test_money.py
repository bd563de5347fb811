"""Minor units against ISO 4217 (hand-written facts and CLDR's table from babel, an independent source),
rounding, plain decimal text, and quotes in minor units."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from overnight.adapters.providers.base import normalize_quote
from overnight.domain import money
from overnight.domain.scoring import FundamentalsTable, compile_rules, parse_rules, score_many


@pytest.mark.parametrize(
    ("currency", "unit"),
    [  # ISO 4217 list one (the published table): the minor unit column, written out by hand
        pytest.param("USD", "0.01", id="USD"), pytest.param("EUR", "0.01", id="EUR"),
        pytest.param("BRL", "0.01", id="BRL"), pytest.param("GBP", "0.01", id="GBP"),
        pytest.param("JPY", "1", id="JPY"), pytest.param("KRW", "1", id="KRW"), pytest.param("CLP", "1", id="CLP"),
        pytest.param("ISK", "1", id="ISK"), pytest.param("VND", "1", id="VND"),
        pytest.param("KWD", "0.001", id="KWD"), pytest.param("BHD", "0.001", id="BHD"),
        pytest.param("OMR", "0.001", id="OMR"), pytest.param("TND", "0.001", id="TND"),
        pytest.param("CLF", "0.0001", id="CLF"),
    ],
)
def test_minor_units_are_iso_4217s(currency, unit):
    assert money.minor_unit(currency) == D(unit)
    assert str(money.minor_unit(currency)) == unit


def test_minor_units_agree_with_cldr_for_every_common_currency():
    from babel.numbers import get_currency_precision
    from iso4217 import Currency

    # CLDR (babel, pinned in requirements.in) writes these with no decimals where ISO 4217 has a minor unit
    # (its own "digits" for display, e.g. IQD 0 against ISO's 3): the only codes where the two sources disagree
    cldr_differs = {"AFN", "ALL", "IQD", "IRR", "KPW", "LAK", "LBP", "MGA", "MMK", "RSD", "SOS", "SYP", "YER"}
    for code in sorted(cldr_differs):  # each really differs (and is ISO's): the list cannot quietly grow
        assert money.minor_unit(code) != D(1).scaleb(-get_currency_precision(code)), f"{code} agrees with CLDR now"
    checked = 0
    for c in Currency:
        if c.exponent is None or c.code in cldr_differs:
            continue
        assert money.minor_unit(c.code) == D(1).scaleb(-get_currency_precision(c.code)), c.code
        checked += 1
    assert checked > 150


@pytest.mark.parametrize(
    ("code", "message"),
    [pytest.param("ZZZ", "not an ISO 4217 code", id="unknown"), pytest.param("XAU", "has no minor unit", id="gold")],
)
def test_a_currency_without_a_minor_unit_is_refused_by_name(code, message):
    with pytest.raises(money.CurrencyError, match=f"{code}.*{message}"):
        money.minor_unit(code)


@pytest.mark.parametrize(
    ("amount", "currency", "down", "half_up"),
    [
        pytest.param("1666.666", "JPY", "1666", "1667", id="yen"),
        pytest.param("1666.666", "USD", "1666.66", "1666.67", id="dollars"),
        pytest.param("1.23456", "KWD", "1.234", "1.235", id="dinar"),
        pytest.param("0.00005", "CLF", "0.0000", "0.0001", id="unidad-de-fomento"),
    ],
)
def test_rounding_to_the_minor_unit(amount, currency, down, half_up):
    assert money.text(money.round_down(D(amount), currency)) == down
    assert money.amount_text(D(amount), currency) == half_up


@pytest.mark.parametrize(
    ("value", "text"),
    [pytest.param(D("1E-7"), "0.0000001", id="tiny"), pytest.param(D("0E-7"), "0.0000000", id="zero-exponent"),
     pytest.param(D("1E+2"), "100", id="positive-exponent"), pytest.param(D("-2.50"), "-2.50", id="plain")],
)
def test_decimal_text_is_never_in_exponent_notation(value, text):
    assert money.text(value) == text


def test_a_score_of_tiny_points_is_written_in_plain_digits():
    rules = compile_rules(parse_rules([{"metric": "m", "op": ">", "value": 0, "points": "0.0000001"},
                                       {"metric": "m", "op": ">", "value": 5, "points": "-0.0000001"}]))
    table = FundamentalsTable()
    table.add({1: {"m": D(1)}, 2: {"m": D(9)}})
    found = score_many([(rules, [table.rows[1], table.rows[2]])], table)[0]
    assert found.texts == ["0.0000001", "0.0000000"]


@pytest.mark.parametrize(
    ("price", "currency", "expected"),
    [pytest.param("80", "GBp", ("0.8", "GBP"), id="pence"), pytest.param("1250", "ZAc", ("12.5", "ZAR"), id="cents"),
     pytest.param("80", "GBP", ("80", "GBP"), id="pounds-unchanged")],
)
def test_quotes_in_minor_units_become_major_units(price, currency, expected):
    value, code = normalize_quote(D(price), currency)
    assert (str(value.normalize()) if value != value.to_integral() else str(value), code) == expected or \
        (money.text(value.normalize()), code) == expected
