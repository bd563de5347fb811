"""Recommendations: where a contribution goes, by allocation gaps first, then by score."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from operator import attrgetter
from typing import TypeVar

CENT = Decimal("0.01")
HUNDRED = Decimal(100)
PER_CLASS = 3  # how many of a class's best-scored assets share its money
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
        """The middle of the range: where money goes once the minimum is met."""
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
    """Buy `amount` (base currency) of an asset; `allocation_gap` is its class's gap in points."""

    candidate: Candidate
    amount: Decimal
    allocation_gap: Decimal


def shortlist(ranked: Iterable[T], class_of: Callable[[T], str]) -> list[T]:
    """Of items sorted best first, those `recommend` can pick: each class's best PER_CLASS and the best
    2 x PER_CLASS overall. `recommend` on the shortlist answers as on all the items."""
    out: list[T] = []
    per_class: dict[str, int] = {}
    for i, item in enumerate(ranked):
        name = class_of(item)
        seen = per_class.get(name, 0)
        if seen < PER_CLASS or i < PER_CLASS * 2:
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


def split_to_cents(total: Decimal, weights: dict[str, Decimal]) -> dict[str, Decimal]:
    """Splits `total` by weights into cents that add up to it exactly (largest remainder)."""
    total = total.quantize(CENT)
    positive = {k: w for k, w in weights.items() if w > 0}
    if total <= 0 or not positive:
        return {k: Decimal(0) for k in weights}
    wsum = sum(positive.values(), Decimal(0))
    raw = {k: total * w / wsum for k, w in positive.items()}
    floors = {k: v.quantize(CENT, rounding=ROUND_DOWN) for k, v in raw.items()}
    left = int(((total - sum(floors.values(), Decimal(0))) / CENT).to_integral_value())
    for k in sorted(positive, key=lambda k: (-(raw[k] - floors[k]), k))[:left]:
        floors[k] += CENT
    return {k: floors.get(k, Decimal(0)) for k in weights}


def _class_weights(
    contribution: Decimal, values: dict[str, Decimal], targets: list[Target], eligible: set[str]
) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """Returns (money weight per class, gap in points per class)."""
    zero = _ZERO
    total_before = sum(values.values(), zero)
    total_after = total_before + contribution
    mids = {t.class_name: t.mid_pct for t in targets}
    gaps = {}
    for t in targets:
        name = t.class_name
        current = values.get(name, zero) * HUNDRED / total_before if total_before else zero
        gaps[name] = (mids[name] - current).quantize(CENT)
    pool = [t for t in targets if t.class_name in eligible]
    alloc = {t.class_name: zero for t in pool}
    remaining = contribution

    def fill(need: dict[str, Decimal]) -> None:
        nonlocal remaining
        need = {k: v for k, v in need.items() if v > 0}
        total_need = sum(need.values(), zero)
        if remaining <= 0 or total_need <= 0:
            return
        if total_need >= remaining:
            for k, v in need.items():
                alloc[k] += remaining * v / total_need
            remaining = zero
        else:
            for k, v in need.items():
                alloc[k] += v
            remaining -= total_need

    # 1. classes below their minimum, in proportion to the gap; 2. toward the middle of the range;
    # 3. up to the maximum; 4. anything left (all classes full) by the middle of the range.
    # A step is skipped once nothing remains (it could not change anything).
    for level in ("min", "mid", "max"):
        if remaining <= 0:
            break
        fill({t.class_name: (t.min_pct if level == "min" else mids[t.class_name] if level == "mid" else t.max_pct)
              * total_after / HUNDRED - (values.get(t.class_name, zero) + alloc[t.class_name]) for t in pool})
    if remaining > 0 and pool:
        pool_mids = {t.class_name: mids[t.class_name] for t in pool}
        if sum(pool_mids.values(), zero) <= 0:
            pool_mids = {t.class_name: Decimal(1) for t in pool}
        fill({k: remaining * v / sum(pool_mids.values(), zero) for k, v in pool_mids.items()})
    return alloc, gaps


def recommend(
    contribution: Decimal,
    values: dict[str, Decimal],
    targets: list[Target],
    candidates: list[Candidate],
    *,
    check_targets: bool = True,
) -> list[Recommendation]:
    """Spreads the contribution over the best-scored assets of each class, by allocation gap.

    `values` is the current holding value per class in the base currency. Amounts are cents that
    add up to the contribution exactly (when any asset is eligible), none negative.
    """
    if check_targets:  # callers that validated already (the pipeline, per user) skip the second check
        validate_targets(targets)
    if contribution <= 0 or not candidates:
        return []
    by_class: dict[str, list[Candidate]] = {}
    ordered = sorted(candidates, key=_RANK)
    for c in ordered:
        by_class.setdefault(c.class_name, []).append(c)
    if targets:
        class_money, gaps = _class_weights(contribution, values, targets, set(by_class))
    else:
        class_money, gaps = {}, {}
    if not class_money or sum(class_money.values(), Decimal(0)) <= 0:
        # No usable targets: the best-scored assets overall share the contribution.
        best = ordered[: PER_CLASS * 2]
        weights = {c.symbol: Decimal(1) for c in best}
    else:
        weights = {}
        for name, money in class_money.items():
            picks = by_class.get(name, [])[:PER_CLASS]
            for c in picks:
                weights[c.symbol] = money / len(picks)
    amounts = split_to_cents(contribution, weights)
    by_symbol = {c.symbol: c for c in candidates}
    recs = [
        Recommendation(by_symbol[s], amt, gaps.get(by_symbol[s].class_name, Decimal(0)))
        for s, amt in amounts.items()
        if amt > 0
    ]
    return sorted(recs, key=lambda r: (-r.amount, r.candidate.symbol))
