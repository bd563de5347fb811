"""Scoring: a user's criteria are rules over asset fundamentals; a score is the exact sum of points."""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from itertools import compress
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

OPS = (">=", "<=", ">", "<", "==", "between")
SCORING_VERSION = 1  # bump whenever how a score is computed changes (the audit trail records it: calcVersion)
NO_USABLE_PRICE = "no usable price"  # the reason of an asset left unscored for want of a price


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
        return Score(None, reason=NO_USABLE_PRICE)
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


# --------------------------------------------------------------------------- many assets at once
#
# `score_asset` is the definition. The batch scores each user's universe (about 50 assets) in a few
# numpy operations instead: comparisons on floats are exact for decimals of at most 15 significant
# digits (float conversion is correctly rounded and monotonic, so order and equality are kept), and points
# are summed as scaled integers, so every score is the Decimal `score_asset` gives. Assets with values
# outside that (missing, not numbers, more digits) are marked and left to `score_asset`, reasons and all.

_FLOAT_DIGITS = 15


def _exact_float(x: Any) -> float:
    """`x` as a float when comparisons on it are exact, else NaN."""
    if type(x) is Decimal and x.is_finite() and len(x.as_tuple().digits) <= _FLOAT_DIGITS:
        return float(x)
    return math.nan


class FundamentalsTable:
    """The fundamentals of a batch's assets as a float matrix: a row per asset, a column per metric.

    NaN marks a value that is missing or not exactly comparable as a float, and `absent` the missing
    ones (None or no such key); column 0 is all NaN and absent, and stands for metrics no asset has."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}
        self.columns: dict[str, int] = {"": 0}
        self._data: list[list[float]] = []
        self._absent: list[list[bool]] = []
        self._matrix: np.ndarray | None = None
        self._absent_matrix: np.ndarray | None = None

    def add(self, assets: dict[int, dict[str, Any]]) -> None:
        """Adds the assets (id -> fundamentals) not in the table yet."""
        new = [(aid, f) for aid, f in assets.items() if aid not in self.rows]
        if not new:
            return
        names = sorted({k for _, f in new for k in f}.difference(self.columns))
        if names:
            for name in names:
                self.columns[name] = len(self.columns)
            for row in self._data:
                row.extend([math.nan] * len(names))
            for flags in self._absent:
                flags.extend([True] * len(names))
        width, columns = len(self.columns), self.columns
        for aid, fundamentals in new:
            self.rows[aid] = len(self._data)
            row = [math.nan] * width
            absent = [True] * width
            for name, value in fundamentals.items():
                row[columns[name]] = _exact_float(value)
                absent[columns[name]] = value is None
            self._data.append(row)
            self._absent.append(absent)
        self._matrix = self._absent_matrix = None

    @property
    def matrix(self) -> np.ndarray:
        """The (assets x metrics) float matrix."""
        import numpy as np  # imported on first use: DAG parsing and the other tasks never pay for it

        if self._matrix is None:
            self._matrix = np.array(self._data, dtype=np.float64).reshape(len(self._data), len(self.columns))
        return self._matrix

    @property
    def absent(self) -> np.ndarray:
        """The (assets x metrics) matrix of missing values (None or no such key)."""
        import numpy as np

        if self._absent_matrix is None:
            self._absent_matrix = np.array(self._absent, dtype=bool).reshape(len(self._absent), len(self.columns))
        return self._absent_matrix


@dataclass(slots=True)
class CompiledRules:
    """A criteria set as intervals over metrics (`lo` < or <= x < or <= `hi`), points scaled to integers.

    `exact` is False when a rule's bound has more digits than a float keeps: then `score_asset` scores."""

    rules: tuple[Rule, ...]
    exact: bool
    metrics: list[str]
    lo: list[float]
    lo_closed: list[bool]
    hi: list[float]
    hi_closed: list[bool]
    points: list[int]  # points * 10**scale
    scale: int
    exponents: list[int]  # each rule's points exponent (at most 0): a Decimal sum's is the least matched


def compile_rules(rules: tuple[Rule, ...]) -> CompiledRules:
    """Prepares a parsed criteria set for `score_rows`."""
    bounds = [r.value for r in rules] + [r.upper for r in rules if r.upper is not None]
    exact = all(len(v.as_tuple().digits) <= _FLOAT_DIGITS for v in bounds)
    exponents = [int(r.points.as_tuple().exponent) for r in rules]
    scale = max(0, *(-e for e in exponents))
    scaled = [int(r.points.scaleb(scale)) for r in rules]
    if any(abs(p) > 2**53 // max(1, len(rules)) for p in scaled):  # sums must stay exact in int64
        exact, scaled = False, [0] * len(rules)
    inf = math.inf
    lo, lo_closed, hi, hi_closed = [], [], [], []
    for r in rules:
        v = float(r.value)
        a, ac, b, bc = {">=": (v, True, inf, True), ">": (v, False, inf, True), "<=": (-inf, True, v, True),
                        "<": (-inf, True, v, False), "==": (v, True, v, True)}.get(
            r.op, (v, True, float(r.upper) if r.upper is not None else inf, True))
        lo.append(a)
        lo_closed.append(ac)
        hi.append(b)
        hi_closed.append(bc)
    return CompiledRules(rules, exact, [r.metric for r in rules], lo, lo_closed, hi, hi_closed, scaled, scale,
                         [min(e, 0) for e in exponents])


@dataclass(slots=True)
class RowScores:
    """`score_rows`' answer, by position: `texts` (None: left to `score_asset`), `values` (exact numbers to
    rank by: int, or Decimal when points have decimals), `counts`, `tops` (the top contributor's metric)."""

    texts: list[str | None]
    values: list[Any]
    counts: list[int]
    tops: list[str]
    reasons: dict[int, str] = field(default_factory=dict)  # unscored positions whose reason is known

    def score(self, j: int) -> Score:
        """The `Score` at position j (a vectorised one)."""
        value = self.values[j]
        return Score(value if type(value) is Decimal else Decimal(value), self.counts[j], self.tops[j])


def score_rows(compiled: CompiledRules, table: FundamentalsTable, rows: list[int]) -> RowScores:
    """Scores the (priced) assets at table `rows`; positions whose text is None need `score_asset`."""
    return score_many([(compiled, rows)], table)[0]


def score_many(requests: list[tuple[CompiledRules, list[int]]], table: FundamentalsTable) -> list[RowScores]:
    """Scores many users at once: each request is a user's criteria and the table rows of their priced assets.

    One numpy pass over every (asset, rule) pair of the chunk: the per-call cost of numpy is paid once per
    chunk, not per user. Positions whose text is None need `score_asset` (missing or inexact values)."""
    import numpy as np

    out: list[RowScores] = [RowScores([None] * len(rows), [None] * len(rows), [0] * len(rows), [""] * len(rows))
                            for _, rows in requests]
    todo = [q for q, (c, rows) in enumerate(requests) if c.exact and rows]
    if not todo:
        return out
    scale = max(requests[q][0].scale for q in todo)
    # the chunk's rules, each compiled set once, points at the common scale
    offsets: dict[int, int] = {}
    sets: list[CompiledRules] = []
    n_set_rules = 0
    for q in todo:
        c = requests[q][0]
        if id(c) not in offsets:
            offsets[id(c)] = n_set_rules
            n_set_rules += len(c.rules)
            sets.append(c)
    factor = [10 ** (scale - c.scale) for c in sets]
    if len(todo) > 1 and any(max(map(abs, c.points)) * f > 2**53 // len(c.rules)
                             for c, f in zip(sets, factor, strict=True)):
        return [score_many([r], table)[0] for r in requests]  # scales too far apart for one int64 pass
    columns = table.columns
    rule_col = np.array([columns.get(m, 0) for c in sets for m in c.metrics], dtype=np.intp)
    rule_lo = np.array([v for c in sets for v in c.lo], dtype=np.float64)
    rule_hi = np.array([v for c in sets for v in c.hi], dtype=np.float64)
    rule_lo_closed = np.array([v for c in sets for v in c.lo_closed], dtype=bool)
    rule_hi_closed = np.array([v for c in sets for v in c.hi_closed], dtype=bool)
    rule_points = np.array([p * f for c, f in zip(sets, factor, strict=True) for p in c.points], dtype=np.int64)
    rule_magnitude = np.abs(rule_points)
    rule_exp = np.array([e for c in sets for e in c.exponents], dtype=np.int64)
    # one entry per (user, asset); pairs are (entry, rule of that user)
    rows_all: list[int] = []
    counts_per_request: list[int] = []
    starts_per_request: list[int] = []
    for q in todo:
        c, rows = requests[q]
        rows_all.extend(rows)
        counts_per_request.append(len(rows))
        starts_per_request.append(offsets[id(c)])
    n_entries = np.array(counts_per_request, dtype=np.intp)
    n_rules = np.repeat(np.array([len(requests[q][0].rules) for q in todo], dtype=np.intp), n_entries)
    first_rule = np.repeat(np.array(starts_per_request, dtype=np.intp), n_entries)
    group = np.cumsum(n_rules) - n_rules  # first pair of each entry
    pairs = int(n_rules.sum())
    pair_entry = np.repeat(np.arange(len(rows_all)), n_rules)
    pair_rule = np.repeat(first_rule - group, n_rules) + np.arange(pairs)
    x = table.matrix[np.array(rows_all, dtype=np.intp)[pair_entry], rule_col[pair_rule]]
    lo, hi = rule_lo[pair_rule], rule_hi[pair_rule]
    matched = (np.where(rule_lo_closed[pair_rule], x >= lo, x > lo)
               & np.where(rule_hi_closed[pair_rule], x <= hi, x < hi))
    nan = np.isnan(x)
    unsure_mask = np.logical_or.reduceat(nan, group)
    unsure = unsure_mask.tolist()
    reasons: dict[int, str] = {}  # entry -> reason, where the first rule (in order) without a value has none
    if unsure_mask.any():
        uncertain = np.flatnonzero(unsure_mask)
        local = np.arange(pairs) - np.repeat(group, n_rules)
        first_nan = np.minimum.reduceat(np.where(nan, local, pairs), group)[uncertain]
        first_pair = group[uncertain] + first_nan
        rows_arr = np.array(rows_all, dtype=np.intp)
        absent = table.absent[rows_arr[uncertain], rule_col[pair_rule[first_pair]]]
        entry_request = np.repeat(np.arange(len(todo)), n_entries)[uncertain]
        for entry, q, rule, gone in zip(uncertain.tolist(), entry_request.tolist(), first_nan.tolist(),
                                        absent.tolist(), strict=True):
            if gone:  # what score_asset answers: it stops at the first rule whose value is missing
                reasons[entry] = f"missing fundamental '{requests[todo[q]][0].metrics[rule]}'"
    totals = np.add.reduceat(np.where(matched, rule_points[pair_rule], 0), group).tolist()
    counts = np.add.reduceat(matched.astype(np.int64), group).tolist()
    key = np.where(matched, rule_magnitude[pair_rule], -1)
    best = np.repeat(np.maximum.reduceat(key, group), n_rules)
    hits = np.flatnonzero(key == best)  # every entry has one: its maximum; the first is the top contributor
    firsts = hits[np.unique(pair_entry[hits], return_index=True)[1]]
    top_local = (pair_rule[firsts] - first_rule).tolist()
    exps = np.minimum.reduceat(np.where(matched, rule_exp[pair_rule], 0), group).tolist() if scale else None
    k = 0
    for q in todo:
        c, rows = requests[q]
        end = k + len(rows)
        metrics = c.metrics
        if scale == 0:  # whole points: the sum's text is the integer's
            values: list[Any] = totals[k:end]
            texts: list[str | None] = [str(t) for t in values]
        else:
            assert exps is not None
            values = [Decimal(t).scaleb(-scale).quantize(Decimal(1).scaleb(e))
                      for t, e in zip(totals[k:end], exps[k:end], strict=True)]
            texts = [format(v, "f") for v in values]  # plain digits: never '1E-7'
        cnt = counts[k:end]
        tops = [metrics[t] if n else "" for t, n in zip(top_local[k:end], cnt, strict=True)]
        mine: dict[int, str] = {}
        for j, flag in enumerate(unsure[k:end]):
            if flag:
                texts[j] = None
                if (reason := reasons.get(k + j)) is not None:
                    mine[j] = reason
        out[q] = RowScores(texts, values, cnt, tops, mine)
        k = end
    return out


# --------------------------------------------------------------------------- shared criteria, scored once
#
# A score is a function of the criteria version and the asset's fundamentals, not of the user: the users who
# share a criteria version (the templates: 85 % of users share 30 of them) get each asset's score from a memo
# the batch fills once per (criteria version, asset), instead of one numpy pass over their ~400 (asset, rule)
# pairs each. A criteria version only one user of the chunk has (a personal one) is scored per user, as before.

MemoEntry = tuple[str | None, Any, int, str, str | None]  # (text, value, count, top contributor, reason)


def score_memoised(requests: list[tuple[str, CompiledRules, list[int]]], table: FundamentalsTable,
                   memo: dict[str, dict[int, MemoEntry]]) -> list[RowScores]:
    """`score_many` for requests `(criteria version, compiled rules, table rows)`, each answer equal to it.

    A version that two requests of the call share, or that `memo` (the batch's, kept across its chunks) already
    holds, is shared: its rows not in the memo yet are scored once, in the same numpy pass as the personal
    requests, and every request of that version is answered from the memo. The others are scored as they are.

    Measured on the XNYS batch of a 20,000-user seed (11,743 users in 12 chunks of 1,000; 30 templates): the
    scoring step 47-48 -> 33-35 µs of CPU per user (best of 7 rounds each, interleaved, on the shared 2-core
    machine; 30-32 ms a chunk once the memo is warm). The memo then holds 82,136 entries (30 versions x the
    batch's assets), a few MB: bounded by versions x assets, not by users."""
    per_version = Counter(key for key, _, _ in requests)
    shared = {key for key, n in per_version.items() if n > 1 or key in memo}
    missing: dict[str, tuple[CompiledRules, set[int]]] = {}
    for key, compiled, rows in requests:
        if key in shared:
            known = memo.get(key, {})
            missing.setdefault(key, (compiled, set()))[1].update(set(rows).difference(known))
    direct = [q for q, (key, _, _) in enumerate(requests) if key not in shared]
    calls = [(compiled, sorted(rows)) for compiled, rows in missing.values()]
    calls += [(requests[q][1], requests[q][2]) for q in direct]
    found = score_many(calls, table) if calls else []
    for key, (_, rows), got in zip(missing, calls, found, strict=False):
        memo.setdefault(key, {}).update(zip(rows, zip(got.texts, got.values, got.counts, got.tops,
                                                      map(got.reasons.get, range(len(rows))), strict=True), strict=True))
    out: list[RowScores | None] = [None] * len(requests)
    for q, got in zip(direct, found[len(missing):], strict=True):
        out[q] = got
    for q, (key, _, rows) in enumerate(requests):
        if key not in shared:
            continue
        if not rows:
            out[q] = RowScores([], [], [], [])
            continue
        entries = memo[key]
        texts, values, counts, tops, reasons = zip(*map(entries.__getitem__, rows), strict=True)
        out[q] = RowScores(list(texts), list(values), list(counts), list(tops),
                           dict(compress(enumerate(reasons), reasons)))  # reasons are None or non-empty
    return out  # type: ignore[return-value]
