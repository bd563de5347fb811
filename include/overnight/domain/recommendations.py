"""Recommendations: the allocation policy of `docs/allocation.md`, buy-only and never past a class's maximum.

A contribution fills the classes below their minimum, then toward their midpoint, then up to their
maximum, each step in proportion to how far each class is from its mark; what no class can take stays
unallocated, with the reason. A class's money goes equally to its three best-scored candidates above the
score floor. Amounts are in the currency's minor unit, rounded down, remainder by largest remainder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from operator import attrgetter
from typing import TypeVar

ALLOCATION_POLICY = 3  # bump whenever a rule of docs/allocation.md changes (the audit trail records it)
CENT = Decimal("0.01")
HUNDRED = Decimal(100)
PER_CLASS = 3  # how many of a class's best-scored assets share its money
DEFAULT_SCORE_FLOOR = Decimal(0)  # an asset scored at or below the floor is never bought
_RANK = attrgetter("rank")
_ZERO = Decimal(0)
T = TypeVar("T")


class AllocationError(ValueError):
    """Allocation targets are unusable (e.g. minimums above 100 %); the message says which."""


@dataclass(frozen=True)
class Target:
    """A class's allocation target range, in percent of the portfolio."""

    class_name: str
    min_pct: Decimal
    max_pct: Decimal

    @property
    def mid_pct(self) -> Decimal:
        """The middle of the range."""
        return (self.min_pct + self.max_pct) / 2


@dataclass(slots=True)
class Candidate:
    """A scored asset the contribution may buy (`rank`: best score first, then symbol)."""

    asset_id: int
    symbol: str
    class_name: str
    score: Decimal
    criteria_count: int
    top_contributor: str
    rank: tuple[Decimal, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rank = (-self.score, self.symbol)


@dataclass(slots=True)
class Recommendation:
    """Buy `amount` (base currency) of an asset; the gaps are its class's, in points (docs/allocation.md)."""

    candidate: Candidate
    amount: Decimal
    allocation_gap: Decimal
    allocation_gap_after: Decimal


@dataclass(frozen=True)
class Unallocated:
    """Money the policy did not place: `amount` (base currency), `reason` (a code) and a `message`."""

    amount: Decimal
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class Allocation:
    """What `recommend` decided: the buys (largest first) and what stays unallocated."""

    recommendations: list[Recommendation]
    unallocated: Unallocated


def shortlist(ranked: Iterable[T], class_of: Callable[[T], str]) -> list[T]:
    """Of items sorted best first, each class's best PER_CLASS: all that `recommend` can pick."""
    out: list[T] = []
    per_class: dict[str, int] = {}
    for item in ranked:
        name = class_of(item)
        seen = per_class.get(name, 0)
        if seen < PER_CLASS:
            out.append(item)
        per_class[name] = seen + 1
    return out


def validate_targets(targets: list[Target]) -> None:
    """Raises AllocationError for targets no portfolio can meet."""
    for t in targets:
        if t.min_pct < 0 or t.max_pct > HUNDRED or t.min_pct > t.max_pct:
            raise AllocationError(
                f"allocation target '{t.class_name}': range {t.min_pct}-{t.max_pct}% is not within 0-100"
            )
    total_min = sum((t.min_pct for t in targets), Decimal(0))
    if total_min > HUNDRED:
        raise AllocationError(f"allocation targets: minimums add up to {total_min}% (more than 100%)")


def _scale(numbers: Iterable[Decimal]) -> int:
    """The power of ten that makes every one of `numbers` (finite decimals) a whole number, plus one (so that a
    midpoint, half of min + max, is whole too)."""
    return 1 + max(0, *(-int(d.as_tuple().exponent) for d in numbers))


def _fill_classes(
    contribution: Decimal, values: dict[str, Decimal], pool: list[Target], s: int
) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Steps 1-3 of the policy, exactly: returns each class's money as a fraction (numerator, denominator) and the
    money left that no class can take, in units of 1/B of the currency, with B = 100 x 10**(2s) (returned third).

    Exact, so targets whose maxima add up to 100 % place the whole contribution: with 28-digit decimals ~1e-23
    stayed "unplaced" (0.01 unallocated in a quarter of such contributions) and the order of the targets changed
    the amounts in about one run in 750. In whole numbers, not `fractions.Fraction`: measured on a 4-class
    portfolio (timeit, 5,000 calls, quiet machine), the decimals took 46 us a call, Fractions 201 us, these
    whole numbers 70-75 us.
    Only the last, proportional step divides: the one fraction, over `total_need`."""
    scale = 10 ** s
    big = 100 * scale  # money x big x scale = money x B
    remaining = int(contribution.scaleb(s)) * big
    total = sum(int(v.scaleb(s)) for v in values.values()) + int(contribution.scaleb(s))  # money x 10**s
    held = {t.class_name: int(values.get(t.class_name, _ZERO).scaleb(s)) * big for t in pool}
    alloc = dict.fromkeys(held, 0)
    # percent x 10**s, whole: the midpoint's half included, as `_scale` gave s one digit more
    marks = [{t.class_name: int(t.min_pct.scaleb(s)) for t in pool},
             {t.class_name: int((t.min_pct + t.max_pct).scaleb(s)) // 2 for t in pool},
             {t.class_name: int(t.max_pct.scaleb(s)) for t in pool}]
    for mark in marks:
        if remaining <= 0:
            break
        need = {}
        for name, pct in mark.items():
            short = pct * total - held[name] - alloc[name]  # pct/100 x total money, in 1/B units
            if short > 0:
                need[name] = short
        total_need = sum(need.values())
        if total_need <= 0:
            continue
        if total_need >= remaining:  # not enough for every class: in proportion to how far each is; the last step
            return ({name: (a * total_need + (remaining * need[name] if name in need else 0), total_need)
                     for name, a in alloc.items()}, 0, big * scale)
        for name, short in need.items():
            alloc[name] += short
        remaining -= total_need
    return {name: (a, 1) for name, a in alloc.items()}, remaining, big * scale


def _split_units(total_units: int, exact: dict[str, tuple[int, int]], unit: int) -> dict[str, int]:
    """Largest remainder in whole minor units of exact shares (numerator, denominator) in the same units as `unit`:
    each rounded down, the units left one each to the largest remainders (equal remainders: by symbol)."""
    floors: dict[str, int] = {}
    rests: dict[str, tuple[int, int]] = {}
    for k, (n, d) in exact.items():
        floors[k], rest = divmod(n, d * unit)
        rests[k] = (rest, d * unit)
    common = math.lcm(*(d for _, d in rests.values())) if rests else 1  # remainders compared over one denominator
    left = total_units - sum(floors.values())
    for k in sorted(exact, key=lambda k: (-rests[k][0] * (common // rests[k][1]), k))[:max(0, left)]:
        floors[k] += 1
    return floors


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def recommend(
    contribution: Decimal,
    values: dict[str, Decimal],
    targets: list[Target],
    candidates: list[Candidate],
    *,
    unit: Decimal = CENT,
    score_floor: Decimal = DEFAULT_SCORE_FLOOR,
    check_targets: bool = True,
    unvalued: Iterable[str] = (),
) -> Allocation:
    """Places `contribution` (a multiple of `unit`, the base currency's minor unit) by docs/allocation.md.

    `values` is the valued holdings per class in the base currency (untargeted classes included: they
    count in the portfolio's total); `unvalued` names holdings whose value is unknown (then nothing is placed). Amounts are multiples of `unit`, none negative, and they add up with
    the unallocated amount to the contribution exactly.
    """
    if check_targets:  # callers that validated already (the pipeline, per user) skip the second check
        validate_targets(targets)
    if contribution <= 0:
        return Allocation([], Unallocated(_ZERO, "no_contribution", "the contribution is zero"))
    if not targets:
        return Allocation([], Unallocated(contribution, "no_targets",
                                          "no allocation targets: set targets to get recommendations"))
    unknown = sorted(set(unvalued))
    if unknown:  # a holding of unknown value: every class's share is unknown, so no advice (never as if worth zero)
        return Allocation([], Unallocated(contribution, "portfolio_unpriced",
                                          f"the value of {', '.join(unknown)} is unknown (no price or exchange rate "
                                          "was ever known): no advice until the whole portfolio can be valued"))
    targeted = {t.class_name for t in targets}
    by_class: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=_RANK):
        if c.score > score_floor and c.class_name in targeted:
            by_class.setdefault(c.class_name, []).append(c)
    if not by_class:
        return Allocation([], Unallocated(contribution, "no_candidates",
                                          f"no asset of a targeted class is scored above {score_floor}"))
    total_before = sum(values.values(), _ZERO)
    total_after = total_before + contribution
    pool = sorted((t for t in targets if t.class_name in by_class), key=attrgetter("class_name"))
    s = _scale([contribution, unit, *values.values(), *(p for t in pool for p in (t.min_pct, t.max_pct))])
    class_money, left, b = _fill_classes(contribution, values, pool, s)
    unit_b = int(unit.scaleb(s)) * (b // 10 ** s)  # one minor unit in 1/b units
    invest_units = (int(contribution.scaleb(s)) * (b // 10 ** s) - left) // unit_b
    invest = invest_units * unit
    exact: dict[str, tuple[int, int]] = {}
    for name, (num, den) in class_money.items():
        picks = by_class[name][:PER_CLASS]
        for c in picks:
            exact[c.symbol] = (num, den * len(picks))
    amounts = {sym: n * unit for sym, n in _split_units(invest_units, exact, unit_b).items()}

    mids = {t.class_name: t.mid_pct for t in targets}
    bought: dict[str, Decimal] = {}
    picked = {c.symbol: c for picks in by_class.values() for c in picks[:PER_CLASS]}
    for symbol, amount in amounts.items():
        name = picked[symbol].class_name
        bought[name] = bought.get(name, _ZERO) + amount

    def gap(name: str, added: Decimal) -> Decimal:
        held = values.get(name, _ZERO) + added
        share = held * HUNDRED / total_after if total_after else _ZERO
        return (mids[name] - share).quantize(CENT)

    gaps = {name: (gap(name, _ZERO), gap(name, added)) for name, added in bought.items()}  # a class's, once
    recs = [
        Recommendation(picked[s], amt, *gaps[picked[s].class_name])
        for s, amt in amounts.items()
        if amt > 0
    ]
    recs.sort(key=lambda r: (-r.amount, r.candidate.symbol))
    rest = contribution - invest
    if rest <= 0:
        return Allocation(recs, Unallocated(_ZERO))
    if left >= unit_b:  # a whole minor unit or more that no class can take; less is rounding (below)
        without = {t.class_name for t in targets if t.class_name not in by_class
                   and values.get(t.class_name, _ZERO) * HUNDRED < t.min_pct * total_after}
        message = f"{_names(by_class)} reached the maximum of their target range"
        if without:
            message += f"; {_names(without)} below the minimum but with no asset scored above {score_floor}"
        return Allocation(recs, Unallocated(rest, "targets_full", message))
    return Allocation(recs, Unallocated(rest, "rounding", "less than one minor unit was left that no class could "
                                                          "take without passing its maximum"))
