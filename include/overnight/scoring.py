"""Scoring: a user's criteria are rules over asset fundamentals; a score is the exact sum of points."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

OPS = (">=", "<=", ">", "<", "==", "between")


class CriteriaError(ValueError):
    """A criteria rule does not parse; the message names the rule and what is wrong."""


@dataclass(frozen=True)
class Rule:
    """`metric op value` gives `points` (negative points take away)."""

    metric: str
    op: str
    value: Decimal
    points: Decimal
    upper: Decimal | None = None  # for `between` (inclusive bounds value..upper)

    def matches(self, x: Decimal) -> bool:
        """Returns whether a fundamental value satisfies the rule."""
        if self.upper is not None:
            return self.value <= x <= self.upper
        return bool(_OPS[self.op](x, self.value))


_OPS: dict[str, Callable[[Decimal, Decimal], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}


@dataclass(slots=True)
class Score:
    """An asset's score, or why it has none."""

    score: Decimal | None
    criteria_count: int = 0  # rules that matched
    top_contributor: str = ""  # metric of the matched rule with the largest absolute points
    reason: str = ""


def _dec(raw: Any, where: str) -> Decimal:
    if isinstance(raw, bool) or raw is None:
        raise CriteriaError(f"{where}: expected a number, got {raw!r}")
    try:
        value = Decimal(str(raw))
    except (InvalidOperation, ValueError):
        raise CriteriaError(f"{where}: expected a number, got {raw!r}") from None
    if not value.is_finite():
        raise CriteriaError(f"{where}: expected a finite number, got {raw!r}")
    return value


def parse_rules(raw: Any) -> tuple[Rule, ...]:
    """Parses criteria JSON (a list of {metric, op, value, points}); raises CriteriaError."""
    if not isinstance(raw, list) or not raw:
        raise CriteriaError("criteria: expected a non-empty list of rules")
    rules = []
    for i, item in enumerate(raw, 1):
        where = f"criteria rule {i}"
        if not isinstance(item, dict):
            raise CriteriaError(f"{where}: expected an object, got {type(item).__name__}")
        metric, op = item.get("metric"), item.get("op")
        if not isinstance(metric, str) or not metric:
            raise CriteriaError(f"{where}: 'metric' must be a fundamental's name")
        if op not in OPS:
            raise CriteriaError(f"{where}: unknown op {op!r}; use one of {', '.join(OPS)}")
        points = _dec(item.get("points"), f"{where} 'points'")
        if op == "between":
            bounds = item.get("value")
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise CriteriaError(f"{where}: 'between' needs value [low, high]")
            lo, hi = _dec(bounds[0], f"{where} low"), _dec(bounds[1], f"{where} high")
            if lo > hi:
                raise CriteriaError(f"{where}: low {lo} is above high {hi}")
            rules.append(Rule(metric, op, lo, points, hi))
        else:
            rules.append(Rule(metric, op, _dec(item.get("value"), f"{where} 'value'"), points))
    return tuple(rules)


def score_asset(rules: tuple[Rule, ...], fundamentals: dict[str, Any], priced: bool) -> Score:
    """Scores one asset: the sum of the points of the rules it matches; unscored if data is missing."""
    if not priced:
        return Score(None, reason="no usable price")
    total = Decimal(0)
    matched = 0
    top_metric, top_abs = "", Decimal(-1)
    for rule in rules:
        x = fundamentals.get(rule.metric)
        if type(x) is not Decimal or not x.is_finite():  # the batch parsed fundamentals once: slow path only here
            if x is None:
                return Score(None, reason=f"missing fundamental '{rule.metric}'")
            try:
                x = Decimal(str(x))
            except (InvalidOperation, ValueError):
                return Score(None, reason=f"fundamental '{rule.metric}' is not a number ({x!r})")
            if not x.is_finite():
                return Score(None, reason=f"fundamental '{rule.metric}' is not finite")
        upper = rule.upper
        if (rule.value <= x <= upper) if upper is not None else _OPS[rule.op](x, rule.value):
            total += rule.points
            matched += 1
            if abs(rule.points) > top_abs:
                top_metric, top_abs = rule.metric, abs(rule.points)
    return Score(total, matched, top_metric)
