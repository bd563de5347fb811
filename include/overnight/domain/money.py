"""Money: each currency's minor unit (ISO 4217), rounding to it, plain decimal text.

The minor units come from the `iso4217` package (the ISO 4217 list as published); no Airflow import.
"""

from __future__ import annotations

import functools
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from importlib.metadata import version as _version

from iso4217 import Currency

# Where the minor units come from, and which list: `iso` and the date of the ISO 4217 list the `iso4217` package
# carries (its version's last part, e.g. 1.16.20260101 -> iso20260101). Short: it is in every calculation's event.
MINOR_UNITS_SOURCE = f"iso{_version('iso4217').rsplit('.', 1)[-1]}"


class CurrencyError(ValueError):
    """A currency code is not an ISO 4217 currency with a minor unit; the message says which."""


@functools.cache
def minor_unit(currency: str) -> Decimal:
    """The currency's smallest amount as a quantum: JPY -> 1, USD -> 0.01, KWD -> 0.001."""
    code = currency.strip().upper()
    try:
        exponent = Currency(code).exponent
    except ValueError:
        raise CurrencyError(f"currency {currency!r} is not an ISO 4217 code; use a code such as USD, EUR, JPY") from None
    if exponent is None:
        raise CurrencyError(f"currency {code} has no minor unit in ISO 4217 (a metal or fund code); "
                            "amounts cannot be expressed in it")
    return Decimal(1).scaleb(-exponent)


def round_down(amount: Decimal, currency: str) -> Decimal:
    """`amount` rounded down (toward zero) to the currency's minor unit."""
    return amount.quantize(minor_unit(currency), rounding=ROUND_DOWN)


def round_half_up(amount: Decimal, currency: str) -> Decimal:
    """`amount` rounded half up to the currency's minor unit (totals and values)."""
    return amount.quantize(minor_unit(currency), rounding=ROUND_HALF_UP)


def text(amount: Decimal) -> str:
    """A decimal as plain digits, never in exponent notation (Decimal('1E-7') -> '0.0000001')."""
    return format(amount, "f")


def amount_text(amount: Decimal, currency: str) -> str:
    """An amount as text with exactly the currency's minor-unit decimals (half up)."""
    return format(round_half_up(amount, currency), "f")


def split_largest_remainder(total: Decimal, exact: dict[str, Decimal], unit: Decimal) -> dict[str, Decimal]:
    """Shares `total` (a multiple of `unit`) among keys whose exact shares add up to at least `total`.

    Each share is rounded down to `unit`; the units left go one each to the largest remainders (equal
    remainders: by key). Returns every key, some possibly zero."""
    floors = {k: v.quantize(unit, rounding=ROUND_DOWN) for k, v in exact.items()}
    left = int((total - sum(floors.values(), Decimal(0))) / unit)
    for k in sorted(exact, key=lambda k: (-(exact[k] - floors[k]), k))[:max(0, left)]:
        floors[k] += unit
    return floors
