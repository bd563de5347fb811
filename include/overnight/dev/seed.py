"""Deterministic synthetic data: assets, prices, rates, criteria, users, portfolios (bulk COPY).

`python -m overnight.dev.seed --users N [--seed S]` replaces the synthetic data set with the one that
N and S define: the same N and S always give the same rows (ids included). Results (job runs,
events, recommendations) are left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg

from overnight.adapters import db

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("6f1c2d1e-9a57-4c41-8d0e-2b9f1f0c7a11")
ASSET_CLASSES = {1: "Stocks", 2: "Real estate", 3: "ETFs", 4: "Fixed income"}
CLASS_WEIGHTS = (0.55, 0.15, 0.2, 0.1)
MARKET_CURRENCY = {"XNYS": "USD", "XNAS": "USD", "BVMF": "BRL", "XLON": "GBP", "XTKS": "JPY", "XETR": "EUR",
                   "XPAR": "EUR", "XAMS": "EUR", "XHKG": "HKD", "XTSE": "CAD", "XASX": "AUD"}
MARKET_ASSETS = {"XNYS": 1200, "BVMF": 500, "XLON": 600, "XTKS": 700}
MARKET_WEIGHT = {"XNYS": 0.45, "BVMF": 0.2, "XLON": 0.2, "XTKS": 0.15}
SYMBOL_SUFFIX = {"BVMF": ".SA", "XLON": ".L", "XTKS": ".T"}
PRICE_RANGE = {"USD": (5, 600), "BRL": (2, 120), "GBP": (1, 60), "JPY": (200, 20000), "EUR": (2, 300)}
USD_RATES = {"USD": "1", "BRL": "5.35", "GBP": "0.79", "JPY": "151.2", "EUR": "0.92", "HKD": "7.8",
             "CAD": "1.38", "AUD": "1.52"}
METRICS = {  # metric: (low, high, decimals)
    "dividend_yield": (0, 12, 2),
    "pe_ratio": (3, 60, 1),
    "roe": (-10, 40, 1),
    "debt_to_equity": (0, 4, 2),
    "revenue_growth": (-20, 50, 1),
    "payout_ratio": (0, 120, 1),
    "price_to_book": (0.3, 12, 2),
}
N_TEMPLATES = 30
CHUNK_USERS = 2_000  # users generated and sent per COPY write: memory is bounded by it (60k users: 62 MB at
# 2,000, 150 MB at 10,000, and no faster)
PERSONAL_SHARE = 0.15


@dataclass(frozen=True)
class Asset:
    """A seeded asset (the parts users are built from)."""

    id: int
    symbol: str
    market: str
    class_id: int
    currency: str


def user_id(seed: int, index: int) -> uuid.UUID:
    """Returns the deterministic id of the index-th synthetic user of a seed."""
    return uuid.uuid5(NAMESPACE, f"user:{seed}:{index}")


def _copy_text(values: Iterable[object]) -> str:
    out = []
    for v in values:
        if v is None:
            out.append("\\N")
        else:
            out.append(str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n"))
    return "\t".join(out)


def _rule(rng: random.Random) -> dict[str, str | list[str]]:
    metric = rng.choice(list(METRICS))
    lo, hi, dec = METRICS[metric]
    op = rng.choice([">=", "<=", ">", "<", "between"])
    points = str(rng.choice([-10, -5, -3, 2, 3, 5, 8, 10, 15]))
    if op == "between":
        a, b = sorted(round(rng.uniform(lo, hi), dec) for _ in range(2))
        return {"metric": metric, "op": op, "value": [str(a), str(b)], "points": points}
    return {"metric": metric, "op": op, "value": str(round(rng.uniform(lo, hi), dec)), "points": points}


def _rules(rng: random.Random) -> list[dict[str, str | list[str]]]:
    return [_rule(rng) for _ in range(rng.randint(5, 10))]


def build_assets(markets: list[str], seed: int) -> list[Asset]:
    """Returns the asset universe: a few hundred to a thousand assets per market."""
    rng = random.Random(f"assets:{seed}")
    assets: list[Asset] = []
    used: set[str] = set()
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for market in markets:
        currency = MARKET_CURRENCY.get(market, "USD")
        for _ in range(MARKET_ASSETS.get(market, 300)):
            while True:
                if market == "XTKS":
                    base = str(rng.randint(1300, 9999))
                else:
                    base = "".join(rng.choice(letters) for _ in range(rng.randint(3, 4)))
                    if market == "BVMF":
                        base += rng.choice(["3", "4", "11"])
                symbol = base + SYMBOL_SUFFIX.get(market, "")
                if symbol not in used:
                    used.add(symbol)
                    break
            class_id = rng.choices(list(ASSET_CLASSES), weights=CLASS_WEIGHTS)[0]
            assets.append(Asset(len(assets) + 1, symbol, market, class_id, currency))
    return assets


def _fundamentals(rng: random.Random) -> dict[str, str]:
    data = {}
    for metric, (lo, hi, dec) in METRICS.items():
        if rng.random() < 0.03:
            continue  # missing fundamental: scoring must say so, not crash
        data[metric] = str(round(rng.uniform(lo, hi), dec))
    return data


def seed(
    conn: psycopg.Connection, users: int, seed_value: int = 42, markets: list[str] | None = None,
    dsn: str | None = None, *, chunk_users: int = CHUNK_USERS, now: datetime | None = None,
) -> dict[str, int]:
    """Replaces the synthetic data set with N users for a seed; returns row counts per table.

    Streams: users, targets, holdings, watchlists and personal criteria are generated and sent by COPY
    `chunk_users` users at a time, each table on a connection of its own, so memory does not grow with N
    (chunk_users changes no row). Peak RSS of a process seeding 1 M users: 65 MB, was 253 MB (the personal
    criteria were kept for the end). `now` (default: this second) dates the prices and rates."""
    if markets is None:
        from overnight.domain.markets import load_markets

        markets = [m.code for m in load_markets().markets]
    if chunk_users < 1:
        raise ValueError("chunk_users must be >= 1")
    markets = sorted(markets)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    rng = random.Random(f"ref:{seed_value}")
    assets = build_assets(markets, seed_value)
    by_market: dict[str, list[Asset]] = {m: [a for a in assets if a.market == m] for m in markets}
    counts: dict[str, int] = {}

    conn.execute(
        "TRUNCATE asset_classes, assets, prices, criteria_sets, users, allocation_targets, holdings, watchlist"
    )
    conn.execute("DELETE FROM exchange_rates WHERE source = 'seed'")
    with conn.cursor().copy("COPY asset_classes (id, name) FROM STDIN") as cp:
        for cid, name in ASSET_CLASSES.items():
            cp.write_row((cid, name))
    with conn.cursor().copy(
        "COPY assets (id, symbol, name, market, class_id, currency, fundamentals) FROM STDIN"
    ) as cp:
        for a in assets:
            cp.write_row((a.id, a.symbol, f"{a.symbol} Corp", a.market, a.class_id, a.currency,
                          json.dumps(_fundamentals(rng))))
    priced = 0
    unpriced: set[int] = set()
    with conn.cursor().copy("COPY prices (asset_id, price, currency, as_of) FROM STDIN") as cp:
        for a in assets:
            if rng.random() < 0.01:
                unpriced.add(a.id)  # on watchlists only: left unscored with a reason
                continue
            lo, hi = PRICE_RANGE.get(a.currency, (1, 500))
            cp.write_row((a.id, Decimal(str(round(rng.uniform(lo, hi), 2))), a.currency,
                          now - timedelta(hours=rng.randint(1, 6))))
            priced += 1
    currencies = sorted({a.currency for a in assets} | {"USD", "EUR"})
    with conn.cursor().copy("COPY exchange_rates (base, quote, rate, as_of, source) FROM STDIN") as cp:
        for q in currencies:
            cp.write_row(("USD", q, Decimal(USD_RATES.get(q, "1")), now - timedelta(hours=1), "seed"))
    counts.update(assets=len(assets), prices=priced, exchange_rates=len(currencies))

    templates = [f"tpl-{i:02d}" for i in range(1, N_TEMPLATES + 1)]
    template_rows = [_copy_text((uuid.uuid5(NAMESPACE, f"criteria:{seed_value}:{k}:1"), k, 1,
                                 f"Template {k[4:]}", json.dumps(_rules(rng)))) for k in templates]

    market_weights = [MARKET_WEIGHT.get(m, 0.1) for m in markets]
    conn.commit()  # release the TRUNCATE locks before the parallel COPYs below
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # One COPY per table, each on its own connection, fed a chunk of users at a time (streaming).
        extra = [stack.enter_context(db.connect(dsn)) for _ in range(4)]
        cps = {
            "users": stack.enter_context(conn.cursor().copy(
                "COPY users (id, email, base_currency, default_contribution, markets, criteria_key) FROM STDIN")),
            "allocation_targets": stack.enter_context(extra[0].cursor().copy(
                "COPY allocation_targets (user_id, class_id, min_pct, max_pct) FROM STDIN")),
            "holdings": stack.enter_context(extra[1].cursor().copy(
                "COPY holdings (user_id, asset_id, quantity) FROM STDIN")),
            "watchlist": stack.enter_context(extra[2].cursor().copy(
                "COPY watchlist (user_id, asset_id) FROM STDIN")),
            "criteria_sets": stack.enter_context(extra[3].cursor().copy(
                "COPY criteria_sets (id, criteria_key, version, name, rules) FROM STDIN")),
        }
        bufs: dict[str, list[str]] = {k: [] for k in cps}
        bufs["criteria_sets"] += template_rows  # the templates first, then each user's own, in user order
        for k in cps:
            counts[k] = 0
        for i in range(users):
            urng = random.Random(f"u:{seed_value}:{i}")
            uid = str(user_id(seed_value, i))
            n_markets = min(len(markets), urng.choices((1, 2, 3), weights=(0.6, 0.3, 0.1))[0])
            chosen: list[str] = []
            while len(chosen) < n_markets:
                m = urng.choices(markets, weights=market_weights)[0]
                if m not in chosen:
                    chosen.append(m)
            base_ccy = MARKET_CURRENCY.get(chosen[0], "USD")
            contribution = None if urng.random() < 0.05 else f"{urng.randint(2, 200) * 50}.00"
            if urng.random() < PERSONAL_SHARE:
                key = f"user-{uid}"
                for version in range(1, urng.randint(1, 2) + 1):
                    bufs["criteria_sets"].append(_copy_text((
                        uuid.uuid5(NAMESPACE, f"criteria:{seed_value}:{key}:{version}"), key, version,
                        "My criteria", json.dumps(_rules(urng)))))
            else:
                key = urng.choice(templates)
            markets_literal = "{" + ",".join(chosen) + "}"
            bufs["users"].append(_copy_text((uid, f"user{i}.s{seed_value}@example.test", base_ccy,
                                             contribution, markets_literal, key)))
            remaining = 90.0
            for cid in ASSET_CLASSES:
                low = round(urng.uniform(0, min(remaining, 40)), 1)
                remaining -= low
                high = round(min(100.0, low + urng.uniform(10, 40)), 1)
                bufs["allocation_targets"].append(f"{uid}\t{cid}\t{low}\t{high}")
            pool = [a for m in chosen for a in by_market[m]]
            n_hold = urng.randint(10, 50)
            n_watch = urng.randint(0, 50)
            picked = urng.sample(pool, min(len(pool), n_hold + n_watch))
            for a in picked[:n_hold]:
                if a.id in unpriced:
                    bufs["watchlist"].append(f"{uid}\t{a.id}")
                    continue
                qty = urng.randint(1, 50) * 100 if a.currency == "JPY" else round(urng.uniform(1, 500), 4)
                bufs["holdings"].append(f"{uid}\t{a.id}\t{qty}")
            for a in picked[n_hold:]:
                bufs["watchlist"].append(f"{uid}\t{a.id}")
            if i % chunk_users == chunk_users - 1:
                _flush(cps, bufs, counts)
        _flush(cps, bufs, counts)  # the last chunk (and the templates when there are no users)
    conn.commit()
    log.debug("seeded %d users in %.1fs", users, time.perf_counter() - t0)  # main() prints the summary
    return counts


def _flush(cps: dict[str, psycopg.Copy], bufs: dict[str, list[str]], counts: dict[str, int]) -> None:
    """Sends each table's buffered rows to its COPY and empties the buffers."""
    for k, buf in bufs.items():
        if buf:
            cps[k].write("\n".join(buf) + "\n")
            counts[k] += len(buf)
            buf.clear()


def main(argv: list[str] | None = None) -> int:
    """Command line: seed N synthetic users into the `overnight_postgres` database."""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.seed", description=__doc__)
    parser.add_argument("--users", type=int, default=1000, help="how many users (default 1000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--chunk", type=int, default=CHUNK_USERS,
                        help=f"users generated and sent per chunk (default {CHUNK_USERS:,}; changes no row)")
    args = parser.parse_args(argv)
    if args.users < 0:
        parser.error("--users must be >= 0")
    if args.chunk < 1:
        parser.error("--chunk must be >= 1")
    t0 = time.perf_counter()
    with db.connect() as conn:
        counts = seed(conn, args.users, args.seed, chunk_users=args.chunk)
        conn.execute("ANALYZE")
    took = time.perf_counter() - t0
    summary = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    print(f"seeded {args.users:,} users (seed {args.seed}) in {took:.1f}s: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
